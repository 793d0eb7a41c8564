"""Two augmented views of one image, each with the crop rectangle it came from.

The augmentation is MoCo v2's (RandomResizedCrop scale (0.2, 1), colour jitter (0.4, 0.4, 0.4,
0.1) with p=0.8, grayscale p=0.2, Gaussian blur σ∈[0.1, 2] with p=0.5, horizontal flip), and the
paper's main-experiment option adds RandAugment (§3.2.3). Geometric steps run first and record
the crop in original-image pixels plus the flip flag (`dupr.geometry` documents the convention);
colour steps do not move pixels, so the record stays exact.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from dupr.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(image: Tensor) -> Tensor:
    """A (3, H, W) image in [0, 1] normalised with the ImageNet statistics the views use."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


class PhotometricRandAugment(T.RandAugment):
    """torchvision's RandAugment without its geometric operations.

    Shear, translation and rotation would move pixels after the crop was recorded and break the
    patch correspondence of Eq. 7, so only the colour/intensity operations are kept. This is our
    deviation from InfoMin's RandAugment, which the paper follows.
    """

    GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]):
        space = super()._augmentation_space(num_bins, image_size)
        return {k: v for k, v in space.items() if k not in self.GEOMETRIC}


class RandomGaussianBlur:
    """Gaussian blur with σ ~ U[0.1, 2.0] on PIL images, as in MoCo v2.

    PIL's filter is used instead of torchvision's GaussianBlur, which converts a PIL image to a
    tensor and back and is several times slower on the CPU data path.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class CropAndFlip:
    """RandomResizedCrop + horizontal flip that also returns the crop record [x1, y1, x2, y2, flip]."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.size = size
        self.crop = T.RandomResizedCrop(size, scale=scale, antialias=True)

    def __call__(self, img: Image.Image) -> tuple[Image.Image, Tensor]:
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        view = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            view = F.hflip(view)
        record = torch.tensor([left, top, left + w, top + h, float(flip)], dtype=torch.float32)
        return view, record


def photometric_transform(cfg: AugmentConfig) -> T.Compose:
    """The colour part of one view, ending in a normalised float tensor."""
    steps: list = []
    if cfg.preset == "mocov2_randaugment":
        steps.append(PhotometricRandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude))
    steps += [
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return T.Compose(steps)


class TwoViews:
    """Returns ``(view1, view2, crop1, crop2)`` for one PIL image.

    Both views are drawn independently from the same augmentation family (t, t' ~ 𝒯 in §3.2.1).
    Randomness comes from torch's global generator, so a caller that seeds it gets reproducible
    views (see `dupr.data.TwoViewDataset`).
    """

    def __init__(self, image_size: int, cfg: AugmentConfig | None = None) -> None:
        cfg = cfg or AugmentConfig()
        self.geometric = CropAndFlip(image_size, scale=cfg.crop_scale)
        self.photometric = photometric_transform(cfg)

    def view(self, img: Image.Image) -> tuple[Tensor, Tensor]:
        pixels, crop = self.geometric(img)
        return self.photometric(pixels), crop

    def __call__(self, img: Image.Image) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        v1, c1 = self.view(img)
        v2, c2 = self.view(img)
        return v1, v2, c1, c2
