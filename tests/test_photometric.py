"""The colour steps on the device: each batched operation against torchvision's op image by
image, the drawn choices against the loader's PIL path, and the device path through training."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from dupr import photometric as P
from dupr.config import AugmentConfig, preset, validate
from dupr.data import bundled_photos
from dupr.data.two_views import TwoViewDataset, build_loader
from dupr.model import DUPR
from dupr.train import build_state, to_device, train
from dupr.views import TwoViews

N = 6


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """N uint8 (3, 48, 56) crops of real photographs."""
    photos = [p.convert("RGB") for _, p in bundled_photos()][:N]
    return torch.stack([F.pil_to_tensor(p.resize((56, 48))) for p in photos])


def per_image(fn, x: torch.Tensor, params) -> torch.Tensor:
    return torch.stack([fn(x[i], p) for i, p in enumerate(params)])


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (P.adjust_brightness, F.adjust_brightness, 0.6, 1.4),
        (P.adjust_contrast, F.adjust_contrast, 0.6, 1.4),
        (P.adjust_saturation, F.adjust_saturation, 0.6, 1.4),
        (P.adjust_hue, F.adjust_hue, -0.5, 0.5),
        (P.adjust_sharpness, F.adjust_sharpness, 0.1, 1.9),
    ],
)
def test_blends_match_torchvision_image_by_image(crops, ours, theirs, low, high):
    x = crops.float() / 255
    factors = torch.linspace(low, high, N)
    want = per_image(lambda img, f: theirs(img, float(f)), x, factors)
    torch.testing.assert_close(ours(x, factors), want, atol=2e-6, rtol=0)


def test_one_blend_step_gives_each_image_its_own_operations_pixels(crops):
    """Brightness, contrast and saturation drawn by different images run as one step
    (`linear_colour`): each image's pixels are exactly those of its own operation's formula
    (the zero terms add exact zeros)."""
    x = crops.float() / 255
    kinds = torch.tensor([P.BRIGHTNESS, P.CONTRAST, P.SATURATION] * (N // 3))
    factors = torch.linspace(0.6, 1.4, N)
    got = P.linear_colour(x, P.blend_coefficients(kinds, factors))
    f, gray = factors.view(-1, 1, 1, 1), P.grayscale(x)
    alone = {
        P.BRIGHTNESS: (x * f).clamp(0, 1),
        P.CONTRAST: (f * x + (1 - f) * gray.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1),
        P.SATURATION: (f * x + (1 - f) * gray).clamp(0, 1),
    }
    for i, kind in enumerate(kinds.tolist()):
        assert torch.equal(got[i], alone[kind][i]), (i, kind)
    # Any other kind (RandAugment's other operations) gets the identity.
    assert torch.equal(P.linear_colour(x, P.blend_coefficients(torch.full((N,), -1), factors)), x)


def test_eight_bit_operations_match_torchvision_exactly(crops):
    x = crops.float() / 255
    bits = torch.tensor([1, 2, 4, 6, 7, 8])
    got = (P.posterize(x, bits) * 255).round().to(torch.uint8)
    assert torch.equal(got, per_image(lambda img, b: F.posterize(img, int(b)), crops, bits))
    got = (P.equalize(x) * 255).round().to(torch.uint8)
    assert torch.equal(got, per_image(lambda img, _: F.equalize(img), crops, range(N)))
    flat = torch.full_like(x, 128 / 255)  # a single value: equalisation leaves it alone
    assert torch.equal(P.equalize(flat), flat)
    thresholds = torch.linspace(0, 255, N)
    want = per_image(lambda img, t: F.solarize(img, float(t) / 255), x, thresholds)
    assert torch.equal(P.solarize(x, thresholds), want)
    want = per_image(lambda img, _: F.autocontrast(img), x, range(N))
    torch.testing.assert_close(P.autocontrast(x), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(P.grayscale(x), F.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_blur_is_a_gaussian_and_close_to_pils(crops):
    x = crops.float() / 255
    sigmas = torch.linspace(0.1, 2.0, N)
    ours = P.gaussian_blur(x, sigmas)
    # torchvision pads by reflection, we replicate the edge as PIL does: compare inside.
    r = (17 - 1) // 2
    want = per_image(lambda img, s: F.gaussian_blur(img, [17, 17], [float(s)] * 2), x, sigmas)
    torch.testing.assert_close(ours[..., r:-r, r:-r], want[..., r:-r, r:-r], atol=1e-5, rtol=0)
    pil = per_image(
        lambda img, s: F.pil_to_tensor(
            F.to_pil_image(img).filter(ImageFilter.GaussianBlur(radius=float(s)))
        ),
        crops,
        sigmas,
    )
    assert (ours - pil.float() / 255).abs().mean() < 2 / 255  # PIL approximates with box blurs


def test_device_path_draws_the_loaders_choices_and_crops():
    """With the same seed, both paths crop alike and make the same colour choices: the images
    differ only by rounding and PIL's approximations."""
    photos = [p.convert("RGB") for _, p in bundled_photos()]
    std = torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    for name in ("mocov2", "mocov2_randaugment"):
        loader_side = TwoViews(64, AugmentConfig(preset=name))
        device_side = TwoViews(64, AugmentConfig(preset=name, photometric_on="device"))
        errors = []
        for seed in range(40):
            img = photos[seed % len(photos)]
            torch.manual_seed(seed)
            want = loader_side(img)
            torch.manual_seed(seed)
            got = device_side(img)
            assert got["view1"].dtype == torch.uint8 and got["view1"].shape == (3, 64, 64)
            for v in "12":
                assert torch.equal(got[f"crop{v}"], want[f"crop{v}"])
                pixels = P.apply_photometric(got[f"view{v}"][None], got[f"photometric{v}"][None])
                errors.append(((pixels[0] - want[f"view{v}"]) * std).abs().mean().item())
        # A different choice anywhere (grayscale or not, another RandAugment op) would show as
        # tens of levels; rounding and PIL's 8-bit HSV and box blur are one to three.
        assert np.mean(errors) < 2 / 255 and max(errors) < 6 / 255, (name, max(errors))


def test_choices_follow_mocov2s_probabilities():
    torch.manual_seed(0)
    draw = P.PhotometricDraw(AugmentConfig(preset="mocov2_randaugment", randaugment_ops=3))
    rows = torch.stack([draw() for _ in range(4000)])
    assert rows.shape == (4000, P.RANDAUGMENT + 6)
    assert abs(rows[:, P.JITTER_ON].mean() - P.JITTER_P) < 0.03
    assert abs(rows[:, P.GRAYSCALE_ON].mean() - P.GRAYSCALE_P) < 0.03
    blurred = rows[:, P.BLUR] > 0
    assert abs(blurred.float().mean() - P.BLUR_P) < 0.03
    assert rows[blurred, P.BLUR].min() >= 0.1 and rows[blurred, P.BLUR].max() <= 2.0
    jittered = rows[rows[:, P.JITTER_ON] > 0]
    orders = jittered[:, P.JITTER_ORDER].sort(dim=1).values
    assert torch.equal(orders, torch.arange(4.0).expand_as(orders))  # a permutation each
    assert jittered[:, 5:8].min() >= 0.6 and jittered[:, 5:8].max() <= 1.4
    assert jittered[:, 8].abs().max() <= 0.1
    ops = rows[:, P.RANDAUGMENT :: 2].long()
    counts = torch.bincount(ops.flatten(), minlength=len(P.RANDAUGMENT_OPS))
    assert len(counts) == len(P.RANDAUGMENT_OPS) == 9 and counts.min() > 0.8 * counts.float().mean()


def test_cudnn_benchmark_mode_is_off_inside_and_restored(crops, monkeypatch):
    """The blurs see a new image count almost every step: no autotuning for each."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    monkeypatch.setitem(
        P._RANDAUGMENT_FNS,
        "Equalize",
        lambda x, m: seen.append(torch.backends.cudnn.benchmark) or x,
    )
    rows = torch.zeros(N, P.RANDAUGMENT + 2)
    rows[:, P.RANDAUGMENT] = P.RANDAUGMENT_OPS.index("Equalize")
    P.apply_photometric(crops, rows)
    assert seen == [False] and torch.backends.cudnn.benchmark is True


def test_rows_of_another_width_and_float_views_are_refused(crops):
    with pytest.raises(ValueError, match="12 columns"):
        P.apply_photometric(crops, torch.zeros(N, 12))
    with pytest.raises(ValueError, match="take uint8 crops"):
        P.apply_photometric(crops.float(), torch.zeros(N, P.RANDAUGMENT))


class Photos:
    def __init__(self, n: int) -> None:
        self.images = [p.convert("RGB") for _, p in bundled_photos()][:n]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return self.images[i]


def test_training_with_colour_steps_on_the_device():
    """The user's path: the loader ships uint8 crops and choices, the step applies them."""
    cfg = preset("cpu_demo")
    cfg.augment = dataclasses.replace(cfg.augment, photometric_on="device")
    cfg.model.image_size, cfg.model.queue_size = 64, 64
    cfg.optim.batch_size, cfg.optim.epochs = 4, 1
    validate(cfg)
    images = Photos(8)
    transform = TwoViews(cfg.model.image_size, cfg.augment)
    loader = build_loader(images, transform, 4, seed=1, num_workers=1)
    batch = next(iter(loader))
    assert batch["view1"].dtype == torch.uint8 and batch["photometric1"].shape[0] == 4
    v1, v2, c1, _ = to_device(batch, torch.device("cpu"), channels_last=False)
    assert v1.dtype == torch.float32 and v1.shape == (4, 3, 64, 64) and torch.isfinite(v1).all()
    # Each image of the batch got its own choices: as the same image alone.
    single = TwoViewDataset(images, transform, seed=1)[(0, int(batch["index"][0]))]
    alone = P.apply_photometric(single["view1"][None], single["photometric1"][None])
    torch.testing.assert_close(v1[:1], alone, atol=1e-5, rtol=0)
    alone = P.apply_photometric(single["view2"][None], single["photometric2"][None])
    torch.testing.assert_close(v2[:1], alone, atol=1e-5, rtol=0)  # both views in one call
    state = build_state(DUPR(cfg.model), cfg.optim, len(loader), torch.device("cpu"))
    logged = []
    log = lambda step, metrics: logged.append(metrics)  # noqa: E731
    train(state, loader, cfg.optim, torch.device("cpu"), log_every=1, on_log=log)
    assert state.step == 2 and logged and np.isfinite(logged[-1]["loss"])


@pytest.mark.slow  # compiling takes ~30 s on 2 cores with a cold cache
def test_compiled_colour_steps_give_the_eager_pixels():
    """optim.compile's colour steps (`apply_photometric(..., compiled=True)`, one compiled graph
    per operation for every count of images): the eager pixels up to summation order, for a
    batch in which every operation is drawn by several images, for one image alone (a count of
    1 compiles apart) and through `to_device`, as a training step calls them."""
    cfg = AugmentConfig(preset="mocov2_randaugment", photometric_on="device")
    photos = [p.convert("RGB") for _, p in bundled_photos()]
    views = TwoViews(32, cfg)
    torch.manual_seed(3)
    samples = [views(photos[i % len(photos)]) for i in range(16)]
    crops = torch.stack([s[f"view{v}"] for v in "12" for s in samples])
    rows = torch.stack([s[f"photometric{v}"] for v in "12" for s in samples])
    drawn = set(rows[:, P.RANDAUGMENT :: 2].flatten().long().tolist())
    assert drawn == set(range(len(P.RANDAUGMENT_OPS)))  # every RandAugment operation runs
    assert all(rows[:, c].any() for c in (P.JITTER_ON, P.GRAYSCALE_ON, P.BLUR))
    for x, r in ((crops, rows), (crops[:1], rows[:1])):
        eager = P.apply_photometric(x, r)
        torch.testing.assert_close(
            P.apply_photometric(x, r, compiled=True), eager, atol=5e-5, rtol=0
        )

    batch = {
        **{f"view{v}": crops[i * 16 : (i + 1) * 16] for i, v in enumerate("12")},
        **{f"photometric{v}": rows[i * 16 : (i + 1) * 16] for i, v in enumerate("12")},
        "crop1": torch.zeros(16, 5),
        "crop2": torch.zeros(16, 5),
    }
    cpu = torch.device("cpu")
    for got, want in zip(
        to_device(batch, cpu, channels_last=False, compiled=True),
        to_device(batch, cpu, channels_last=False),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=0)
