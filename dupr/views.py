"""Two augmented views of one image, each with the crop rectangle it came from.

The augmentation is MoCo v2's (RandomResizedCrop scale (0.2, 1), colour jitter (0.4, 0.4, 0.4,
0.1) with p=0.8, grayscale p=0.2, Gaussian blur σ∈[0.1, 2] with p=0.5, horizontal flip), and the
paper's main-experiment option adds RandAugment (§3.2.3). Geometric steps run first and record
the crop in original-image pixels plus the flip flag (`dupr.geometry` documents the convention);
colour steps (`dupr.photometric`) do not move pixels, so the record stays exact. They run in the
loader, or, with ``augment.photometric_on=device``, on the training device: then a view leaves the
loader as its uint8 crop plus the row of colour choices drawn for it.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor

from dupr.config import AugmentConfig
from dupr.photometric import PhotometricDraw, photometric_transform


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


class TwoViews:
    """Two views of one PIL image: ``{view1, view2, crop1, crop2}`` (+ ``photometric1/2``).

    Both views are drawn independently from the same augmentation family (t, t' ~ 𝒯 in §3.2.1).
    Views are normalised (3, P, P) float tensors; with ``photometric_on=device`` they are the
    (3, P, P) uint8 crops, and ``photometric1/2`` hold the colour choices that
    `dupr.photometric.apply_photometric` applies on the device. Randomness comes from torch's
    global generator, drawn in the same order either way, so a caller that seeds it gets
    reproducible views and the same crops on both paths (see `dupr.data.TwoViewDataset`).
    """

    def __init__(self, image_size: int, cfg: AugmentConfig | None = None) -> None:
        cfg = cfg or AugmentConfig()
        self.geometric = CropAndFlip(image_size, scale=cfg.crop_scale)
        self.colour = photometric_transform(cfg)
        self.draw = PhotometricDraw(cfg) if cfg.photometric_on == "device" else None

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        sample = {}
        for v in ("1", "2"):
            pixels, sample[f"crop{v}"] = self.geometric(img)
            if self.draw is not None:  # the colour steps run on the training device
                sample[f"view{v}"] = F.pil_to_tensor(pixels)
                sample[f"photometric{v}"] = self.draw()
            else:
                sample[f"view{v}"] = self.colour(pixels)
        return sample
