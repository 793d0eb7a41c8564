"""Projection heads: image-level (GAP + MLP, Eq. 8's h) and patch-level (RoIAlign + pixel-wise MLP, Eq. 5–6's g).

The heads return raw embeddings; the encoder L2-normalises all of them in one call
(`normalize_rows`), as MoCo's builder normalises the encoder's output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from dupr.geometry import unflip_grid
from dupr.roi_align import roi_align_rows


def normalize_rows(*embeddings: Tensor) -> list[Tensor]:
    """Each (..., d) tensor L2-normalised over d, in one `F.normalize` on all their rows.

    Why one call: with α and β on four levels an encoder has up to eight heads, and
    F.normalize is 3 kernels forward and 15 backward per call; at a per-GPU batch of 64 these
    launches, not their arithmetic, are what they cost (benchmarks/step_operators.py). The
    values are those of one call per tensor.
    """
    rows = [e.reshape(-1, e.shape[-1]) for e in embeddings]
    unit = F.normalize(rows[0] if len(rows) == 1 else torch.cat(rows), dim=1)
    pieces = unit.split([len(r) for r in rows])
    return [u.view(e.shape) for u, e in zip(pieces, embeddings, strict=True)]


class ImageHead(nn.Module):
    """h(GAP(f)): MoCo v2's two-layer MLP on the globally pooled feature map (v of Eq. 8 once
    L2-normalised)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, feat: Tensor) -> Tensor:
        return self.mlp(feat.mean(dim=(2, 3)))


class PatchHead(nn.Module):
    """g(RoIAlign(f, B_v)) (Eq. 5–6): S×S patch embeddings of the intersection box (r once
    L2-normalised).

    g is the paper's pixel-wise MLP ("implemented by a 1×1 convolution"), run here as Linear
    layers on each cell's feature vector: the pooled cells are laid out as rows (N, S, S, C), so
    its matmuls need no layout conversion and the embeddings come out in the cell-major order
    the patch loss reads. g has no BatchNorm, so the key side can apply it on a shuffled batch
    without changing the result. Grids of flipped views are mirrored back so that cell p covers
    the same original-image region in both views; g acts on each cell alone, so this is done on
    its d-dimensional output rather than on the C channels of the pooled features.
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
        kernel: str = "torchvision",
    ) -> None:
        super().__init__()
        self.roi_size, self.stride = roi_size, stride
        self.aligned, self.sampling_ratio = aligned, sampling_ratio
        self.kernel = kernel  # RoIAlign's: model.roi_align_kernel
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def pool(self, feat: Tensor, boxes: Tensor) -> Tensor:
        """RoIAlign of one box per image (boxes (N, 4) in view pixels) → cells (N, S, S, C) in
        the map's dtype, on the view's grid (mirrored where the view is)."""
        if self.kernel == "matmul":
            return roi_align_rows(
                feat, boxes, self.roi_size, 1.0 / self.stride, self.sampling_ratio, self.aligned
            )
        rois = torch.cat(
            [torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1
        )
        # In float32 (the boxes need its precision; under autocast the map may be bf16), from
        # the NCHW layout the kernel reads: one copy of a channels_last map.
        pooled = roi_align(
            feat.to(torch.float32, memory_format=torch.contiguous_format),
            rois.float(),
            output_size=self.roi_size,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )
        # (N, C, S, S) → rows of C channels, cast back to the map's dtype, in one copy.
        return pooled.to(feat.dtype, memory_format=torch.channels_last).permute(0, 2, 3, 1)

    def forward(self, feat: Tensor, boxes: Tensor, crops: Tensor) -> Tensor:
        """Patch embeddings (N, d, S, S), un-mirrored; stored cell-major (channels_last), so
        that the (N·S², d) rows are a view."""
        cells = self.pool(feat, boxes)  # (N, S, S, C)
        # On the (N·S², C) rows: the in-place ReLU then acts on a matmul's own output, not on
        # a view of it, which autograd would have to copy around.
        rows = self.mlp(cells.flatten(0, 2))
        return unflip_grid(rows.view(*cells.shape[:3], -1).permute(0, 3, 1, 2), crops)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before g ran as Linear layers hold its weights as 1×1
        # convolutions, (out, in, 1, 1): the same numbers.
        for i in (0, 2):
            key = f"{prefix}mlp.{i}.weight"
            if key in state_dict and state_dict[key].dim() == 4:
                state_dict[key] = state_dict[key].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
