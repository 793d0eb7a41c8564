"""Projection heads: image-level (GAP + MLP, Eq. 8's h) and patch-level (RoIAlign + 1×1 MLP, Eq. 5–6's g)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from dupr.geometry import unflip_grid


class ImageHead(nn.Module):
    """v = h(GAP(f)): MoCo v2's two-layer MLP on the globally pooled feature map."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, feat: Tensor) -> Tensor:
        return F.normalize(self.mlp(feat.mean(dim=(2, 3))), dim=1)


class PatchHead(nn.Module):
    """r = g(RoIAlign(f, B_v)) (Eq. 5–6): S×S patch embeddings of the intersection box.

    The MLP is pixel-wise (1×1 convolutions) and has no BatchNorm, so the key side can apply it
    on a shuffled batch without changing the result. Grids of flipped views are mirrored back
    so that cell p covers the same original-image region in both views.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        roi_size: int,
        stride: int,
        aligned: bool = False,
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        self.roi_size, self.stride = roi_size, stride
        self.aligned, self.sampling_ratio = aligned, sampling_ratio
        self.mlp = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, out_dim, 1),
        )

    def pool(self, feat: Tensor, boxes: Tensor, crops: Tensor) -> Tensor:
        """RoIAlign of one box per image (boxes (N, 4) in view pixels) → (N, C, S, S), un-mirrored."""
        rois = torch.cat(
            [torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1
        )
        # RoIAlign in float32: under autocast the map may be bf16 and the boxes must match it.
        pooled = roi_align(
            feat.float(),
            rois.float(),
            output_size=self.roi_size,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )
        return unflip_grid(pooled, crops)

    def forward(self, feat: Tensor, boxes: Tensor, crops: Tensor) -> Tensor:
        pooled = self.pool(feat, boxes, crops).to(feat.dtype)
        return F.normalize(self.mlp(pooled), dim=1)
