"""Feature analyses of §4.6.1 (Eq. 9), §4.6.2 (patch correspondence) and Table VI b (probe)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.ops import box_iou

from dupr.backbone import ResNetBackbone
from dupr.config import LEVELS, STRIDES
from dupr.evaluation.correspondence import (
    cell_centres,
    correspondence_accuracy,
    grid_size,
    match_patches,
    patch_correspondence,
    patch_correspondence_levels,
    plot_correspondence,
    true_correspondence,
)
from dupr.evaluation.linear_probe import linear_probe, probe_accuracy, probe_transform
from dupr.evaluation.spatial import (
    IOU_TOLERANCE,
    eq9_similarity,
    iou_similarity,
    plot_iou_similarity,
    rois_at_ious,
    to_input,
)
from dupr.geometry import to_original
from dupr.views import CropAndFlip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def photo(size: int = 160) -> Image.Image:
    """A real photograph shipped with scikit-image, resized (no download)."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def resnet18() -> ResNetBackbone:
    torch.manual_seed(0)
    return ResNetBackbone("resnet18").eval()


# --- Eq. 9 ------------------------------------------------------------------------------------


def test_eq9_known_values():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 16, 7, 7, generator=g)
    assert torch.equal(eq9_similarity(q, q), torch.ones(4))  # exact: computed in float64
    assert torch.equal(eq9_similarity(q, -q), -torch.ones(4))
    assert eq9_similarity(q[0], q[0]).shape == ()
    # Invariant to a positive scale of each position's feature vector.
    scale = torch.rand(4, 1, 7, 7, generator=g) * 100 + 0.01
    k = torch.randn(4, 16, 7, 7, generator=g)
    assert torch.allclose(eq9_similarity(q, k * scale), eq9_similarity(q, k), atol=1e-6)
    # By hand: two positions with cosines 1/√2 and 0 average to 1/(2√2).
    q1 = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])  # (C=2, 1, 2)
    k1 = torch.tensor([[[1.0, 0.0]], [[1.0, 3.0]]])
    assert eq9_similarity(q1, k1).item() == pytest.approx(1 / (2 * math.sqrt(2)), abs=1e-7)
    with pytest.raises(ValueError, match="differ"):
        eq9_similarity(q, q[:, :8])


# --- RoIs at given IoUs and the IoU-similarity curve --------------------------------------------


@pytest.mark.parametrize(
    "gt", [[60.0, 50.0, 160.0, 130.0], [0.0, 0.0, 224.0, 180.0], [5.0, 150.0, 40.0, 200.0]]
)
def test_rois_hit_target_ious_inside_the_image(gt):
    w, h = 224, 200
    targets = torch.linspace(0, 1, 21)
    if gt == [0.0, 0.0, 224.0, 180.0]:
        targets = torch.linspace(0.05, 1, 20)  # a box filling the image cannot reach IoU 0
    boxes, ious = rois_at_ious(torch.tensor(gt), targets, w, h, torch.Generator().manual_seed(0))
    assert boxes.shape == (len(targets), 4)
    assert (ious - targets).abs().max() <= IOU_TOLERANCE
    assert torch.allclose(box_iou(torch.tensor([gt]), boxes)[0], ious, atol=1e-5)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()


def test_rois_reject_bad_box():
    with pytest.raises(ValueError, match="gt_box"):
        rois_at_ious(torch.tensor([50.0, 10.0, 40.0, 30.0]), torch.tensor([0.5]), 100, 100)


def test_iou_similarity_on_resnet(resnet18, tmp_path):
    images = [to_input(photo(160)), to_input(photo(128).transpose(Image.Transpose.ROTATE_90))]
    boxes = [torch.tensor([[30.0, 20.0, 110.0, 100.0], [70.0, 60.0, 150.0, 150.0]])]
    boxes.append(torch.tensor([[10.0, 30.0, 90.0, 120.0]]))
    res = iou_similarity(resnet18, images, boxes, level=2, roi_size=5, rois_per_box=20, bins=10)
    assert len(res.ious) == len(res.sims) == 3 * 20
    assert res.bin_counts.sum() == 60
    full = res.bin_counts > 0
    assert full.sum() >= 8 and np.isfinite(res.bin_means[full]).all()
    assert np.isnan(res.bin_means[~full]).all()
    assert np.isfinite(res.slope) and (np.abs(res.sims) <= 1 + 1e-6).all()
    # Overlapping RoIs see the same pixels: local (CNN) features are more similar for them.
    assert res.slope > 0
    assert res.sims[res.ious > 0.9].mean() > res.sims[res.ious < 0.1].mean()
    rows = res.as_rows()
    assert len(rows) == 10 and sum(r["count"] for r in rows) == 60
    # Reproducible for a seed.
    again = iou_similarity(resnet18, images, boxes, level=2, roi_size=5, rois_per_box=20)
    assert np.array_equal(again.sims, res.sims)
    plot_iou_similarity({"random init": res, "copy": again}, tmp_path / "fig6.png")
    assert_png(tmp_path / "fig6.png")


class ConstantMaps(nn.Module):
    """Stand-in backbone (test input): every level is the same non-zero constant map."""

    def forward(self, x: torch.Tensor, up_to: int = 3) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        return [torch.full((len(x), 8, -(-h // s), -(-w // s)), 3.0) for s in STRIDES[: up_to + 1]]


def test_constant_features_are_equally_similar_at_every_iou():
    image = torch.zeros(3, 96, 128)
    res = iou_similarity(ConstantMaps(), [image], [torch.tensor([[20.0, 10.0, 90.0, 80.0]])])
    assert np.allclose(res.sims, 1.0, atol=1e-6)
    assert np.allclose(res.bin_means[res.bin_counts > 0], 1.0, atol=1e-6)
    assert abs(res.slope) < 1e-6


# --- Patch correspondence -----------------------------------------------------------------------


def test_grid_size_matches_torchvision(resnet18):
    for size in (96, 100, 112):
        maps = resnet18(torch.zeros(1, 3, size, size))
        assert [m.shape[-1] for m in maps] == [grid_size(size, s) for s in STRIDES]


def test_identical_crops_correspond_to_the_same_cell():
    crop = torch.tensor([30.0, 20.0, 150.0, 170.0, 0.0])
    target, valid = true_correspondence(crop, crop, size=112, stride=16)
    assert valid.all() and torch.equal(target, torch.arange(49))


def test_flipped_crop_corresponds_to_the_mirror_shifted_by_one_cell():
    """Cell o's centre s·o mirrors to one pixel from cell G − o (module docstring)."""
    size, stride, g = 112, 16, 7
    crop = torch.tensor([30.0, 20.0, 150.0, 170.0, 0.0])
    flipped = crop.clone()
    flipped[4] = 1.0
    target, valid = true_correspondence(crop, flipped, size, stride)
    assert valid.all()
    row, col = torch.arange(g * g) // g, torch.arange(g * g) % g
    expected_col = (g - col).clamp(max=g - 1)
    assert torch.equal(target, row * g + expected_col)
    mirror_col = g - 1 - col
    assert ((target % g - mirror_col).abs() <= 1).all()  # within one cell of the plain mirror


def test_flipped_pixels_confirm_the_shifted_mirror():
    """Independent check on real pixels: a PIL-flipped view of an image encoding its x."""
    size, stride, g = 112, 16, 7
    x = np.tile(np.arange(size, dtype=np.float64) + 0.5, (size, 1))  # original x per pixel
    view1, view2 = x, x[:, ::-1]
    idx = np.arange(g) * stride  # cell o sits on pixel s·o
    f1 = torch.from_numpy(fourier(view1[np.ix_(idx, idx)], view1[np.ix_(idx, idx)].T))
    f2 = torch.from_numpy(fourier(view2[np.ix_(idx, idx)], view1[np.ix_(idx, idx)].T))
    crop = torch.tensor([0.0, 0.0, size, size, 0.0])
    flipped = torch.tensor([0.0, 0.0, size, size, 1.0])
    target, _ = true_correspondence(crop, flipped, size, stride)
    assert torch.equal(match_patches(f1, f2), target)
    acc, n = correspondence_accuracy(f1, f2, crop, flipped, size, stride, tolerance_cells=0)
    assert acc == 1.0 and n == g * g


def fourier(x, y) -> np.ndarray:
    """(4K, G, G) features whose dot product falls monotonically with |dx| and |dy| (< 1000 px)."""
    freqs = math.pi / 1000 * 2.0 ** -np.arange(4)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    parts = [f(w * v) for w in freqs for v in (x, y) for f in (np.cos, np.sin)]
    return np.stack(parts)


def coordinate_features(crop: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Features of each cell = Fourier features of its centre's ORIGINAL-image coordinates."""
    g = grid_size(size, stride)
    orig = to_original(cell_centres(size, stride)[None], crop.double()[None], size)[0]
    return torch.from_numpy(fourier(orig[:, 0].view(g, g).numpy(), orig[:, 1].view(g, g).numpy()))


def random_crops(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        xy = torch.rand(2, generator=g) * 100
        wh = 80 + torch.rand(2, generator=g) * 200
        c1 = torch.cat([xy, xy + wh, (torch.rand(1, generator=g) < 0.5).float()])
        c2 = c1.clone()
        c2[:4] += torch.randn(4, generator=g) * 30
        c2[4] = float(torch.rand((), generator=g) < 0.5)
        pairs.append((c1, c2))
    return pairs


def test_coordinate_features_match_perfectly_with_and_without_flip():
    size, stride = 224, 16
    flips = set()
    for c1, c2 in random_crops(30, seed=0):
        f1, f2 = coordinate_features(c1, size, stride), coordinate_features(c2, size, stride)
        acc, n = correspondence_accuracy(f1, f2, c1, c2, size, stride, tolerance_cells=0)
        assert n > 0 and acc == 1.0
        flips.add((int(c1[4]), int(c2[4])))
    assert len(flips) == 4  # every flip combination was checked


def test_shuffled_features_match_poorly():
    size, stride = 224, 16
    g = torch.Generator().manual_seed(1)
    accs = []
    for c1, c2 in random_crops(10, seed=1):
        f1, f2 = coordinate_features(c1, size, stride), coordinate_features(c2, size, stride)
        perm = torch.randperm(f2[0].numel(), generator=g)
        shuffled = f2.flatten(1)[:, perm].view_as(f2)
        accs.append(correspondence_accuracy(f1, shuffled, c1, c2, size, stride)[0])
    assert np.mean(accs) < 0.25


def test_real_crops_of_a_coordinate_image_match():
    """Real crop/resize/flip of an image whose pixels encode their own (x, y): no to_original."""
    xs, ys = np.meshgrid(np.arange(256), np.arange(240))
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    size, stride = 112, 16
    idx = np.arange(grid_size(size, stride)) * stride
    torch.manual_seed(0)
    geometric = CropAndFlip(size)
    exact, within_one, n_pairs = [], [], 0
    while n_pairs < 20:
        (v1, c1), (v2, c2) = geometric(img), geometric(img)
        feats = []
        for view in (v1, v2):
            a = view.permute(1, 2, 0).double().numpy()[np.ix_(idx, idx)] + 0.5  # original x, y
            feats.append(torch.from_numpy(fourier(a[..., 0], a[..., 1])))
        acc0, n = correspondence_accuracy(*feats, c1, c2, size, stride, tolerance_cells=0)
        if n == 0:
            continue
        acc1, _ = correspondence_accuracy(*feats, c1, c2, size, stride, tolerance_cells=1)
        exact.append(acc0)
        within_one.append(acc1)
        n_pairs += 1
    assert min(within_one) == 1.0
    assert np.mean(exact) > 0.85


def test_patch_correspondence_on_resnet(resnet18, tmp_path):
    res = patch_correspondence(resnet18, [photo(200)], image_size=128, level=2, pairs_per_image=2)
    g = grid_size(128, 16)
    assert res.num_pairs == 2 and 0 < res.num_valid <= 2 * g * g
    assert 0.0 <= res.accuracy <= 1.0
    assert res.matches.shape == res.target.shape == (g * g,)
    state = torch.get_rng_state()
    again = patch_correspondence(resnet18, [photo(200)], image_size=128, pairs_per_image=2)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    assert again.accuracy == res.accuracy and torch.equal(again.matches, res.matches)
    plot_correspondence(res, tmp_path / "fig7.png", max_lines=30)
    assert_png(tmp_path / "fig7.png")


def test_correspondence_on_conv4_and_conv5_in_one_call(resnet18):
    """Both levels see the same pairs; each reports exact and within-one accuracy."""
    images = [photo(200)]
    by_level = patch_correspondence_levels(
        resnet18, images, image_size=128, levels=(2, 3), pairs_per_image=2
    )
    assert list(by_level) == ["conv4", "conv5"]
    for level, res in zip((2, 3), by_level.values(), strict=True):
        g = grid_size(128, STRIDES[level])
        assert res.stride == STRIDES[level] and res.num_pairs == 2
        assert 0 < res.num_valid <= 2 * g * g
        assert 0.0 <= res.exact <= res.within_one == res.accuracy <= 1.0
        alone = patch_correspondence(resnet18, images, 128, level=level, pairs_per_image=2)
        assert (alone.exact, alone.within_one, alone.num_valid) == (
            res.exact,
            res.within_one,
            res.num_valid,
        )
        assert torch.equal(alone.matches, res.matches)
    exact = patch_correspondence(
        resnet18, images, 128, level=2, pairs_per_image=2, tolerance_cells=0
    )
    assert exact.accuracy == exact.exact == by_level["conv4"].exact
    with pytest.raises(ValueError, match="levels"):
        patch_correspondence_levels(resnet18, images, levels=(4,))


class PositionOnly(torch.nn.Module):
    """A content-blind "backbone": each cell's feature is the one-hot of its grid position."""

    def forward(self, x: torch.Tensor, up_to: int = 3) -> list[torch.Tensor]:
        maps = []
        for stride in STRIDES[: up_to + 1]:
            g = grid_size(x.shape[-1], stride)
            eye = torch.eye(g * g).reshape(g * g, g, g)
            maps.append(eye.expand(len(x), -1, -1, -1))
        return maps


def test_same_position_baseline_is_what_a_content_blind_backbone_scores():
    by_level = patch_correspondence_levels(
        PositionOnly(), [photo(200)], image_size=96, levels=(2, 3), pairs_per_image=4
    )
    for res in by_level.values():
        assert torch.equal(res.matches, torch.arange(len(res.matches)))
        assert res.exact == res.same_position_exact
        assert res.within_one == res.same_position_within_one
        assert 0.0 <= res.same_position_exact <= res.same_position_within_one <= 1.0


def test_correspondence_rejects_wrong_map_size():
    crop = torch.tensor([0.0, 0.0, 100.0, 100.0, 0.0])
    f = torch.zeros(4, 6, 6)
    with pytest.raises(ValueError, match="feat1"):
        correspondence_accuracy(f, f, crop, crop, size=112, stride=16)


# --- Linear probe -------------------------------------------------------------------------------


def test_probe_separable_and_random_labels():
    rng = np.random.default_rng(0)
    means = np.zeros((3, 20))
    means[np.arange(3), np.arange(3)] = 10.0

    def clusters(n):
        y = rng.integers(0, 3, n)
        return means[y] + rng.normal(size=(n, 20)), y

    (tx, ty), (vx, vy) = clusters(150), clusters(150)
    assert probe_accuracy(tx, ty, vx, vy) == 1.0
    assert probe_accuracy(tx, ty, vx, vy, C=[0.01, 0.1, 1.0]) == 1.0
    noise_tx, noise_vx = rng.normal(size=(300, 20)), rng.normal(size=(300, 20))
    acc = probe_accuracy(noise_tx, rng.integers(0, 3, 300), noise_vx, rng.integers(0, 3, 300))
    assert 0.2 < acc < 0.47  # chance is 1/3
    with pytest.raises(ValueError, match="train_x"):
        probe_accuracy(tx, ty, vx[:, :5], vy)


def test_linear_probe_on_resnet(resnet18, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls, colour in (("red", 0), ("blue", 2)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (40, 48, 3))
                a[..., colour] += 150
                Image.fromarray(a.astype(np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    sets = [
        torchvision.datasets.ImageFolder(str(tmp_path / s), transform=probe_transform(32))
        for s in ("train", "val")
    ]
    assert sets[0][0][0].shape == (3, 32, 32)
    scores = linear_probe(resnet18, *sets, batch_size=4)
    assert list(scores) == list(LEVELS)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert linear_probe(resnet18, *sets, levels=(1,)).keys() == {"conv3"}
