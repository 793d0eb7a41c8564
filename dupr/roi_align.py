"""RoIAlign of one box per image as two matmuls (``model.roi_align_kernel=matmul``).

With a fixed sampling ratio g, RoIAlign's value in bin (p, q) is the mean of g×g bilinear
samples of the map, and the bilinear weights, the sample grid and the out-of-map test are all a
product of a y factor and an x factor. For one box per image the pooled grid of each channel is
therefore Wy · F · Wxᵀ, with Wy (S×H) and Wx (S×W) the weights of each map row and column in
each bin (`axis_weights`, which follows torchvision's `roi_align` kernel step by step).

Why not torchvision's kernel, which the default uses: on a GPU its backward scatters with
atomic additions into a float32 NCHW copy of the map (1.2 ms of a DUPR step of 64 on an H200,
benchmarks/RESULTS.md), and a channels_last bf16 map must be converted for it and its gradient
converted back. The two matmuls run in the map's dtype and layout, their backward is two more
matmuls, and the cells come out as the (N, S, S, C) rows the patch head's MLP takes. In float32
the values equal torchvision's to rounding (tests/test_roi_align.py); under bf16 autocast the
weights are rounded to bf16 like the map.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_weights(
    start: Tensor, end: Tensor, size: int, bins: int, sampling_ratio: int, aligned: bool
) -> Tensor:
    """(..., bins, size): the weight of each map row (or column) in each bin along one axis.

    start, end: (...) box edges in map units (already scaled, and shifted by half a cell when
    `aligned`). As torchvision: a box thinner than one cell is widened to one (aligned=False);
    sample i of bin p sits at start + p·b + (i + ½)·b/g, with b the bin's length; a sample
    beyond a cell outside the map counts as zero, one within it is clamped to the edge;
    bilinear weights between floor(y) and floor(y) + 1, which for the clamped y are the tent
    max(0, 1 − |y − r|) over rows r; the mean over the g samples.

    Written in few operators (each a kernel launch on a GPU, where these tensors are tiny): the
    samples, numbered j = p·g + i, sit at the fractions (j + ½) / (bins·g) of the box.
    """
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)
    samples = bins * sampling_ratio
    fractions = torch.linspace(
        0.5 / samples, 1.0 - 0.5 / samples, samples, device=start.device, dtype=start.dtype
    )
    pos = torch.addcmul(start[..., None], length[..., None], fractions)  # (..., bins·g)
    inside = (pos >= -1.0) & (pos <= size)
    rows = torch.arange(size, device=start.device, dtype=start.dtype)
    tent = (1.0 - (pos.clamp(0.0, size - 1.0)[..., None] - rows).abs()).clamp(min=0.0)
    tent = torch.where(inside[..., None], tent, 0.0)  # (..., bins·g, size)
    return tent.view(*start.shape, bins, sampling_ratio, size).mean(dim=-2)


def roi_align_rows(
    feat: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """torchvision's ``roi_align(feat, rois, ...)`` for box n on image n, as cells (N, S, S, C).

    feat: (N, C, H, W), best in channels_last memory (then no copy is made); boxes: (N, 4)
    x1, y1, x2, y2 in input pixels. The result is in the map's dtype, or autocast's.
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio={sampling_ratio}: the matmul form needs a fixed grid")
    n, c, h, w = feat.shape
    # Positions in float32 at least (float64 kept): a bf16 box would be off by pixels.
    box = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    box = box * spatial_scale
    if aligned:
        box = box - 0.5
    if h == w:  # both axes in one call: half the small kernels to launch
        weights = axis_weights(box[:, :2], box[:, 2:], h, output_size, sampling_ratio, aligned)
        wx, wy = weights.to(feat.dtype).unbind(1)  # (N, 2 axes: x, y, S, H)
    else:
        wy = axis_weights(box[:, 1], box[:, 3], h, output_size, sampling_ratio, aligned)
        wx = axis_weights(box[:, 0], box[:, 2], w, output_size, sampling_ratio, aligned)
        wy, wx = wy.to(feat.dtype), wx.to(feat.dtype)
    rows = feat.permute(0, 2, 3, 1).reshape(n, h, w * c)  # (N, H, W·C)
    cols = torch.matmul(wy, rows).view(n, output_size, w, c)  # over H
    return torch.matmul(wx[:, None], cols)  # over W: (N, S, S, C)
