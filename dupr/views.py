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
import torch.nn.functional as nnf
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor

from dupr.config import AugmentConfig
from dupr.photometric import PhotometricDraw, photometric_transform


class CropAndFlip:
    """RandomResizedCrop + horizontal flip that also returns the crop record [x1, y1, x2, y2, flip].

    The crop is resized by torch's antialiased bilinear interpolation of the uint8 pixels in
    their decoded (H, W, 3) layout, not by PIL's `resize` (torchvision's `resized_crop` on a PIL
    image): the filter is the same and the pixels agree within one grey level (rounding;
    `tests/test_views.py` bounds it), but torch has a vectorised kernel for this layout, about
    5× faster (0.14 against 0.78 ms for a 224 px view of a 500×375 photo). With the colour steps
    on the device the loader's part per image is then 2.2-2.6× faster
    (`benchmarks/augmentation_throughput.py`, row (c)), and the loader's CPU cores decide whether
    a GPU waits for data.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.size = size
        self.crop = T.RandomResizedCrop(size, scale=scale, antialias=True)

    def __call__(self, img: Image.Image | Tensor) -> tuple[Tensor, Tensor]:
        """A (3, size, size) uint8 view of `img` (PIL, or (3, H, W) uint8 as `pil_to_tensor`
        gives it: a view of the (H, W, 3) pixels) and its crop record."""
        pixels = F.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        top, left, h, w = self.crop.get_params(pixels, self.crop.scale, self.crop.ratio)
        # The vectorised kernel wants channels_last-contiguous input; the crop of the (H, W, 3)
        # pixels is only channels_last-strided (copying it first halves the resize's time).
        patch = pixels[None, :, top : top + h, left : left + w]
        patch = patch.contiguous(memory_format=torch.channels_last)
        view = nnf.interpolate(patch, size=(self.size, self.size), mode="bilinear", antialias=True)
        flip = bool(torch.rand(()) < 0.5)
        if flip:
            view = view.flip(-1)
        record = torch.tensor([left, top, left + w, top + h, float(flip)], dtype=torch.float32)
        return view[0], record


class TwoViews:
    """Two views of one image: ``{view1, view2, crop1, crop2}`` (+ ``photometric1/2``).

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

    def __call__(self, img: Image.Image | Tensor) -> dict[str, Tensor]:
        """`img`: a PIL image, or (3, H, W) uint8 pixels (`dupr.data.folder.decode_pixels`)."""
        sample = {}
        pixels = F.pil_to_tensor(img) if isinstance(img, Image.Image) else img
        for v in ("1", "2"):
            view, sample[f"crop{v}"] = self.geometric(pixels)
            if self.draw is not None:  # the colour steps run on the training device
                sample[f"view{v}"] = view
                sample[f"photometric{v}"] = self.draw()
            else:
                sample[f"view{v}"] = self.colour(F.to_pil_image(view))
        return sample
