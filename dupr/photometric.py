"""The colour steps of a view: per image with PIL in the loader, or batched on the device.

MoCo v2's colour augmentation — colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with
p=0.2, Gaussian blur σ∈[0.1, 2] with p=0.5 — optionally preceded by RandAugment's photometric
operations (the paper's main setting, §3.2.3), then the ImageNet normalisation. None of these
steps moves a pixel, so a view's crop record (`dupr.views`) is exact whichever side runs them.

``augment.photometric_on``:

- ``loader`` (default): `photometric_transform`, PIL per image in the loader processes, as
  MoCo v2 does.
- ``device``: the loader only draws the random choices (`PhotometricDraw`: the same torch calls
  in the same order as `photometric_transform`, so a seed gives the same choices, and the crop
  records do not change) and ships them as one row of numbers per view beside the uint8 crop;
  `apply_photometric` runs them batched on the training device, each image with its own
  parameters. Why: these steps are most of the loader's CPU time per view (measured in
  `benchmarks/augmentation_throughput.py`), which on a GPU node decides whether the GPU waits
  for data; on the GPU they take a few passes over the batch. The pixels differ from the PIL
  path only by rounding and PIL's approximations (its box-filter blur, 8-bit HSV):
  `tests/test_photometric.py` bounds the difference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as nnf
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch import Tensor

from dupr.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MoCo v2's colour augmentation (its `aug_plus`), the one definition both sides use.
JITTER = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)


def normalise(image: Tensor) -> Tensor:
    """(…, 3, H, W) images in [0, 1] normalised with the ImageNet statistics the views use."""
    mean, std = _imagenet_statistics(image.device)
    return (image - mean) / std


@functools.cache
def _imagenet_statistics(device: torch.device) -> tuple[Tensor, Tensor]:
    """The mean and std as (3, 1, 1) tensors on `device`, made once per device: a tensor made
    from host values is a blocking copy to a GPU, which would make the host wait every step."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)


class PhotometricRandAugment(T.RandAugment):
    """torchvision's RandAugment without its geometric operations.

    Shear, translation and rotation would move pixels after the crop was recorded and break the
    patch correspondence of Eq. 7, so only the colour/intensity operations are kept. This is our
    deviation from InfoMin's RandAugment, which the paper follows.
    """

    GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

    def _augmentation_space(
        self, num_bins: int, image_size: tuple[int, int]
    ) -> dict[str, tuple[Tensor, bool]]:
        # Without the geometric operations nothing depends on the image's size: the table is
        # built once per bin count, not for every view (torchvision rebuilds it on each call:
        # 0.04 ms, twice per image, next to ~3.5 ms for its decoding and crops with the colour
        # steps on the device). Callers only read it.
        return _photometric_space(num_bins)


@functools.cache
def _photometric_space(num_bins: int) -> dict[str, tuple[Tensor, bool]]:
    """RandAugment's operations but the geometric ones: name -> (magnitudes, signed)."""
    space = T.RandAugment._augmentation_space(T.RandAugment(), num_bins, (1, 1))
    return {k: v for k, v in space.items() if k not in PhotometricRandAugment.GEOMETRIC}


class RandomGaussianBlur:
    """Gaussian blur with σ ~ U[0.1, 2.0] on PIL images, as in MoCo v2.

    PIL's filter is used instead of torchvision's GaussianBlur, which converts a PIL image to a
    tensor and back and is several times slower on the CPU data path.
    """

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def photometric_transform(cfg: AugmentConfig) -> T.Compose:
    """The colour part of one view in the loader (PIL), ending in a normalised float tensor."""
    steps: list = []
    if cfg.preset == "mocov2_randaugment":
        steps.append(PhotometricRandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude))
    steps += [
        T.RandomApply([JITTER], p=JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        T.RandomApply([RandomGaussianBlur(BLUR_SIGMA)], p=BLUR_P),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# On the device: the choices as a row of numbers per view, applied to a batch.

# RandAugment's photometric operations, in the order its draw indexes them.
RANDAUGMENT_OPS = tuple(PhotometricRandAugment()._augmentation_space(31, (1, 1)))

# The columns of a parameter row.
JITTER_ON = 0  # 1: colour jitter applies
JITTER_ORDER = slice(1, 5)  # torchvision's permutation: 0 brightness, 1 contrast, 2 sat., 3 hue
JITTER_FACTORS = slice(5, 9)  # brightness, contrast, saturation, hue
GRAYSCALE_ON = 9
BLUR = 10  # σ of the blur; 0: no blur
RANDAUGMENT = 11  # then (operation index, signed magnitude) per RandAugment operation


class PhotometricDraw:
    """Draws one view's colour choices, in the loader, as a float32 row (columns above).

    The torch calls are those of `photometric_transform`'s steps, in the same order: the same
    generator state gives the same choices on both paths.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.randaugment = (
            PhotometricRandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude)
            if cfg.preset == "mocov2_randaugment"
            else None
        )
        self.width = RANDAUGMENT + 2 * (cfg.randaugment_ops if self.randaugment else 0)

    def __call__(self) -> Tensor:
        row = torch.zeros(self.width)
        if self.randaugment is not None:  # as T.RandAugment.forward
            ra = self.randaugment
            space = ra._augmentation_space(ra.num_magnitude_bins, (1, 1))
            for i in range(ra.num_ops):
                op = int(torch.randint(len(space), (1,)).item())
                magnitudes, signed = space[RANDAUGMENT_OPS[op]]
                magnitude = float(magnitudes[ra.magnitude].item()) if magnitudes.ndim > 0 else 0.0
                if signed and torch.randint(2, (1,)):
                    magnitude *= -1.0
                row[RANDAUGMENT + 2 * i] = op
                row[RANDAUGMENT + 2 * i + 1] = magnitude
        if torch.rand(1) <= JITTER_P:  # as T.RandomApply (skips when p < rand)
            order, *factors = JITTER.get_params(
                JITTER.brightness, JITTER.contrast, JITTER.saturation, JITTER.hue
            )
            row[JITTER_ON] = 1.0
            row[JITTER_ORDER] = order.float()
            row[JITTER_FACTORS] = torch.tensor(factors)
        if torch.rand(1) < GRAYSCALE_P:  # as T.RandomGrayscale
            row[GRAYSCALE_ON] = 1.0
        if torch.rand(1) <= BLUR_P:  # as T.RandomApply, then RandomGaussianBlur
            lo, hi = BLUR_SIGMA
            row[BLUR] = lo + (hi - lo) * torch.rand(()).item()
        return row


def apply_photometric(views: Tensor, rows: Tensor, compiled: bool = False) -> Tensor:
    """(B, 3, H, W) uint8 crops and their (B, width) `PhotometricDraw` rows → normalised float32.

    Every image gets its own parameters: each operation runs once on the images that drew it
    (brightness, contrast and saturation as one blend, `linear_colour`).
    Which images those are is read from the rows on the host (they come from the loader there;
    rows already on a GPU cost one synchronisation). `compiled` (``optim.compile``) runs each
    operation through `torch.compile` (`_compiled_step`): the same arithmetic, summed in
    another order.
    """
    rows = rows.detach().to("cpu", torch.float32)
    columns = rows.shape[1]
    if columns < RANDAUGMENT or (columns - RANDAUGMENT) % 2:
        raise ValueError(f"photometric rows have {columns} columns, not {RANDAUGMENT} + 2·ops")
    if views.dtype != torch.uint8:
        raise ValueError(f"views of dtype {views.dtype}: the colour steps take uint8 crops")
    # The blurs' convolutions see a new number of images almost every step: with cuDNN's
    # benchmark mode on (as training sets it) each new shape would be autotuned again.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        return normalise(_apply_rows(views.float().div_(255), rows, compiled))
    finally:
        torch.backends.cudnn.benchmark = benchmark


def _apply_rows(x: Tensor, rows: Tensor, compiled: bool = False) -> Tensor:
    """x with every row's choices applied in place, each operation once on the images that drew
    it: ``x[images] = operation(x[images], parameters)`` (`_step`, or `_compiled_step`'s).

    Which images and which parameters are known on the host before any pixel changes, so they
    go to the device in two copies for the whole batch instead of two per operation (every copy
    is one more launch by the host, and launches are most of what these steps cost on a GPU).
    The copies are non-blocking: from pageable memory CUDA stages them right away, and without
    non_blocking PyTorch would also wait for the GPU to finish its queue.
    """
    steps = []
    for fn, chosen, arg in _choices(rows):
        images = chosen.nonzero().squeeze(1)
        if images.numel():
            steps.append((fn, images, arg[images]))
    if not steps:
        return x
    all_images = torch.cat([images for _, images, _ in steps]).to(x.device, non_blocking=True)
    all_args = torch.cat([arg.reshape(-1) for _, _, arg in steps]).to(x.device, non_blocking=True)
    start = arg_start = 0
    for fn, images, host_arg in steps:
        count, size = images.numel(), host_arg.numel()
        index = all_images[start : start + count]
        arg = all_args[arg_start : arg_start + size].view(host_arg.shape)
        start, arg_start = start + count, arg_start + size
        if compiled:
            _compiled_step(fn)(x, index, arg)
        elif count == x.shape[0]:
            x.copy_(fn(x, arg))
        else:
            _step(fn, x, index, arg)
    return x


def _step(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, index: Tensor, arg: Tensor) -> None:
    """``x[index] = fn(x[index], arg)``, in place."""
    x.index_copy_(0, index, fn(x.index_select(0, index), arg))


@functools.cache
def _compiled_step(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., None]:
    """`_step` of `fn`, compiled: the images' gather, the operation and the scatter back fuse
    into a few kernels instead of one per tensor operator (a colour step is memory-bound
    arithmetic on the whole batch plus, on a GPU, a kernel launch per operator).

    On the 2-core CPU the colour steps of 128 views of the `dupr` preset took 0.44-0.48 of
    the eager time (benchmarks/colour_steps.py, benchmarks/RESULTS.md). Dynamic shapes: how
    many images draw an operation changes every batch; one compiled graph serves every count
    above 1 (a count of 1 compiles apart, and no step runs for none).
    """
    # One code object (`step`) for every operation: dynamo keeps one compiled graph per
    # operation (and per count of 1) under it, more than its default limit of 8.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)

    def step(x: Tensor, index: Tensor, arg: Tensor) -> None:
        _step(fn, x, index, arg)

    return torch.compile(step, dynamic=True)


def _choices(rows: Tensor) -> Iterator[tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]]:
    """(operation, which images chose it, their parameters) in the order the loader's
    `photometric_transform` applies them; rows, masks and parameters on the host."""
    columns = rows.shape[1]
    for i in range(RANDAUGMENT, columns, 2):
        ops, magnitudes = rows[:, i].long(), rows[:, i + 1]
        # Each image takes one operation per slot: the blends of the slot run as one step.
        kinds = _RANDAUGMENT_BLEND_KINDS[ops]
        yield linear_colour, kinds >= 0, blend_coefficients(kinds, 1.0 + magnitudes)
        for op, name in enumerate(RANDAUGMENT_OPS):
            if name in _RANDAUGMENT_FNS:
                yield _RANDAUGMENT_FNS[name], ops == op, magnitudes
    jitter = rows[:, JITTER_ON] > 0
    order, factors = rows[:, JITTER_ORDER].long(), rows[:, JITTER_FACTORS]
    for position in range(4):  # one operation per image and position; HUE is the fourth
        here = order[:, position]
        factor = factors.gather(1, here[:, None]).squeeze(1)
        yield linear_colour, jitter & (here != HUE), blend_coefficients(here, factor)
        yield adjust_hue, jitter & (here == HUE), factor
    yield _grayscale_all, rows[:, GRAYSCALE_ON] > 0, rows[:, 0]
    yield gaussian_blur, rows[:, BLUR] > 0, rows[:, BLUR]


def _grayscale_all(x: Tensor, _: Tensor) -> Tensor:
    return grayscale(x).expand_as(x)


# The operations, batched with one parameter per image (shape (N,)), on float images in [0, 1].
# torchvision's functional ops take one parameter per call, hence these; each follows the
# torchvision tensor op of the same name (tests/test_photometric.py compares them image by image).


def _per_image(p: Tensor) -> Tensor:
    return p.to(torch.float32).view(-1, 1, 1, 1)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    r = _per_image(ratio)
    return (r * a + (1 - r) * b).clamp_(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as torchvision's and PIL's "L" conversion: (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


# Brightness, contrast and saturation are each a blend of the image with (a part of) its grey
# version, x' = clamp(a·x + b·gray(x) + c·mean(gray(x)), 0, 1), with (a, b, c) = (f, 0, 0),
# (f, 0, 1 − f) and (f, 1 − f, 0). One step then runs whichever of the three each image drew,
# in fewer operators than three steps (each operator a kernel launch on a GPU); the zero terms
# add exact zeros, so each image's pixels are those of its own operation alone.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter order


def blend_coefficients(kinds: Tensor, factors: Tensor) -> Tensor:
    """(N, 3) coefficients (a, b, c) of `linear_colour` for each image's operation
    (`BRIGHTNESS`, `CONTRAST`, `SATURATION`; anything else gets the identity) and factor."""
    f = factors.to(torch.float32)
    one_minus_f, zero = 1 - f, torch.zeros_like(f)
    a = torch.where((kinds >= 0) & (kinds <= SATURATION), f, 1 + zero)
    b = torch.where(kinds == SATURATION, one_minus_f, zero)
    c = torch.where(kinds == CONTRAST, one_minus_f, zero)
    return torch.stack([a, b, c], 1)


def linear_colour(x: Tensor, coefficients: Tensor) -> Tensor:
    """clamp(a·x + b·gray(x) + c·mean(gray(x)), 0, 1) with an (a, b, c) row per image."""
    a, b, c = (coefficients[:, i, None, None, None].to(x.dtype) for i in range(3))
    gray = grayscale(x)
    return (a * x + b * gray + c * gray.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return linear_colour(x, blend_coefficients(_kinds(BRIGHTNESS, factor), factor))


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return linear_colour(x, blend_coefficients(_kinds(CONTRAST, factor), factor))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return linear_colour(x, blend_coefficients(_kinds(SATURATION, factor), factor))


def _kinds(kind: int, factor: Tensor) -> Tensor:
    return torch.full(factor.shape, kind, dtype=torch.long, device=factor.device)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue by `factor` turns, through HSV: torchvision's conversion and arithmetic,
    with the hue's three cases (the maximum in red, else green, else blue) selected rather than
    masked and summed, which takes fewer operators (each a kernel launch on a GPU); the inverse
    in the closed form f(n) = V − V·S·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6, which
    needs no 18-plane stack."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eqc, 1.0, maxc)
    divisor = torch.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    # The hue in sixths of a turn, from the channel that holds the maximum.
    sixths = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(sixths / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.to(h.dtype).view(-1, 1, 1), 1.0)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1; no host copy
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    v = maxc.unsqueeze(1)
    return (v - v * s.unsqueeze(1) * ramp).clamp_(0, 1)


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1)/13; border pixels unchanged."""
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = nnf.conv2d(x, kernel, groups=3)
    return _blend(x, smooth, factor)


def _to_uint8_levels(x: Tensor) -> Tensor:
    return x.mul(255).round_().to(torch.int64)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits of the 8-bit value."""
    mask = 256 - torch.pow(2, 8 - bits.to(torch.int64)).view(-1, 1, 1, 1).to(x.device)
    return torch.bitwise_and(_to_uint8_levels(x), mask).to(x.dtype) / 255


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert the values at or above `threshold` (on the 0–255 scale, as RandAugment's)."""
    return torch.where(x >= _per_image(threshold) / 255, 1 - x, x)


def autocontrast(x: Tensor, _: Tensor | None = None) -> Tensor:
    """Stretch each channel to [0, 1]; a constant channel is left alone."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low
    scale = 1.0 / torch.where(flat, torch.ones_like(high), high - low)
    return ((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp_(0, 1)


def equalize(x: Tensor, _: Tensor | None = None) -> Tensor:
    """PIL's histogram equalisation per channel, on the 8-bit values, all channels at once."""
    n, c, h, w = x.shape
    levels = _to_uint8_levels(x).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.int64)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    top = hist.gather(1, levels.amax(1, keepdim=True)).squeeze(1)  # count of the largest value
    step = torch.div(hist.sum(1) - top, 255, rounding_mode="floor")
    below = hist.cumsum(1) - hist
    lut = torch.div(below + (step // 2)[:, None], step.clamp(min=1)[:, None], rounding_mode="floor")
    equalised = lut.clamp_(max=255).gather(1, levels)
    out = torch.where((step > 0)[:, None], equalised, levels)
    return out.view(n, c, h, w).to(x.dtype) / 255


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, σ per image, edges replicated (as PIL's); taps to 4·σ_max."""
    radius = math.ceil(4 * BLUR_SIGMA[1])
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).view(-1, 1)
    taps = torch.exp(-0.5 * (offsets / s) ** 2)
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(x.shape[1], dim=0)
    n, c, h, w = x.shape
    planes = nnf.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    planes = nnf.conv2d(planes, taps.view(n * c, 1, 1, -1), groups=n * c)
    planes = nnf.conv2d(planes, taps.view(n * c, 1, -1, 1), groups=n * c)
    return planes.view(n, c, h, w)


# RandAugment's blends with factor 1 + magnitude: Brightness, Color (saturation) and Contrast
# by `linear_colour`, -1 for the others; then the others by name (Identity does nothing).
_RANDAUGMENT_BLEND_KINDS = torch.tensor(
    [
        {"Brightness": BRIGHTNESS, "Contrast": CONTRAST, "Color": SATURATION}.get(n, -1)
        for n in RANDAUGMENT_OPS
    ]
)
_RANDAUGMENT_FNS = {
    "Sharpness": lambda x, m: adjust_sharpness(x, 1.0 + m),
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
}
