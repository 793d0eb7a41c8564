"""Two views with crop records; reproducible sampling; undecodable files skipped and counted."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from dupr.config import AugmentConfig
from dupr.data import ImageFolderDataset, bundled_photos
from dupr.data.two_views import EpochSampler, TwoViewDataset, build_loader
from dupr.photometric import PhotometricRandAugment
from dupr.views import CropAndFlip, TwoViews


def photo(w=200, h=150, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray((base * 0.8 + rng.integers(0, 50, (h, w, 3))).astype(np.uint8))


def test_two_views_shapes_and_crop_records():
    torch.manual_seed(0)
    t = TwoViews(64)
    flips = []
    for _ in range(50):
        pair = t(photo())
        v1, v2, c1, c2 = (pair[k] for k in ("view1", "view2", "crop1", "crop2"))
        assert v1.shape == v2.shape == (3, 64, 64) and v1.dtype == torch.float32
        for c in (c1, c2):
            x1, y1, x2, y2, f = c.tolist()
            assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 150 and f in (0.0, 1.0)
            area = (x2 - x1) * (y2 - y1) / (200 * 150)
            assert 0.2 - 0.02 <= area <= 1.0  # RandomResizedCrop scale (0.2, 1)
            flips.append(f)
    assert 0.3 < np.mean(flips) < 0.7


@pytest.mark.parametrize("size", [64, 224])  # the photos' crops are scaled up and down
def test_crops_are_resized_as_pil_resizes_them(size):
    """Torch's antialiased bilinear resize of the uint8 crop against torchvision's PIL
    `resized_crop` + `hflip` for the same draw: the same filter, so the pixels differ by at
    most one grey level (rounding), and the crop record is the one the PIL path would draw."""
    crop_and_flip = CropAndFlip(size)
    differing, total = 0, 0
    for _, picture in bundled_photos():
        img = picture.convert("RGB")
        for seed in range(4):
            torch.manual_seed(seed)
            view, record = crop_and_flip(img)
            torch.manual_seed(seed)
            top, left, h, w = crop_and_flip.crop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
            pil = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if torch.rand(()) < 0.5:
                pil = F.hflip(pil)
            assert record[:4].tolist() == [left, top, left + w, top + h]
            diff = (view.int() - F.pil_to_tensor(pil).int()).abs()
            assert view.shape == (3, size, size) and view.dtype == torch.uint8
            assert diff.max() <= 1
            differing, total = differing + int(diff.count_nonzero()), total + diff.numel()
    assert differing / total < 0.25


def test_randaugment_preset_keeps_only_photometric_ops():
    ra = PhotometricRandAugment(2, 9)
    ops = set(ra._augmentation_space(10, (64, 64)))
    assert ops and not ops & {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
    assert {"Brightness", "Color", "Contrast", "Posterize", "Solarize"} <= ops
    pair = TwoViews(64, AugmentConfig(preset="mocov2_randaugment"))(photo())
    assert pair["view1"].shape == (3, 64, 64) and pair["crop1"].shape == (5,)
    # The table is built once, and is torchvision's own for any image size but the geometric rows.
    for size in ((64, 64), (500, 375)):
        theirs = T.RandAugment(2, 9)._augmentation_space(31, size)
        ours = ra._augmentation_space(31, size)
        assert list(ours) == [k for k in theirs if k not in PhotometricRandAugment.GEOMETRIC]
        for k, (magnitudes, signed) in ours.items():
            assert torch.equal(magnitudes, theirs[k][0]) and signed == theirs[k][1]
    assert ra._augmentation_space(31, (64, 64)) is ra._augmentation_space(31, (500, 375))


class Photos:
    def __init__(self, n):
        self.images = [photo(seed=i) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i]


def test_views_depend_only_on_seed_epoch_and_index():
    ds = TwoViewDataset(Photos(4), TwoViews(32), seed=7)
    a = ds[(0, 2)]
    torch.manual_seed(123)  # the caller's generator does not matter ...
    b = ds[(0, 2)]
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["crop2"], b["crop2"])
    state = torch.get_rng_state()
    c = ds[(1, 2)]  # ... and is left untouched; another epoch gives other views
    assert torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a["crop1"], c["crop1"])


def test_a_sample_never_reseeds_an_accelerator_generator(monkeypatch):
    """With the loader in the training process, reseeding CUDA's generator per sample would
    make the step's own random draws a function of the last sample loaded."""
    calls = []
    for module in (torch.cuda, torch.mps, torch.xpu):
        name = "manual_seed_all" if hasattr(module, "manual_seed_all") else "manual_seed"
        monkeypatch.setattr(module, name, lambda seed, n=name: calls.append(n))
    torch.manual_seed(0)
    assert calls  # the patch sees what torch.manual_seed does
    calls.clear()
    TwoViewDataset(Photos(2), TwoViews(32), seed=7)[(0, 1)]
    assert calls == []


def test_epoch_sampler_partitions_ranks_and_resumes_mid_epoch():
    n = 103
    per_rank = []
    for r in range(4):
        s = EpochSampler(n, seed=1, num_replicas=4, rank=r)
        s.set_epoch(3)
        per_rank.append([i for _, i in s])
    assert all(len(p) == 25 for p in per_rank)
    flat = sum(per_rank, [])
    assert len(set(flat)) == 100  # each image at most once per epoch, 3 dropped
    s = EpochSampler(n, seed=1, num_replicas=4, rank=1)
    s.set_epoch(3, start=10)
    assert [i for _, i in s] == per_rank[1][10:] and len(s) == 15
    s.set_epoch(4)
    assert [i for _, i in s] != per_rank[1]


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    for i in range(6):
        photo(seed=i).save(tmp_path / f"img{i}.jpg")
    (tmp_path / "img2.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "img3.jpg").write_bytes((tmp_path / "img4.jpg").read_bytes()[:200])  # truncated
    images = ImageFolderDataset(tmp_path)
    loader = build_loader(images, TwoViews(32), batch_size=3, num_workers=0)
    loader.sampler.shuffle = False
    batches = list(loader)
    assert sum(int(b["skipped"].sum()) for b in batches) == 3  # index 2 skips 2 files, 3 skips 1
    assert batches[0]["view1"].shape == (3, 3, 32, 32)
    assert batches[0]["crop1"].shape == (3, 5)
