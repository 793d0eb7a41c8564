"""RoIAlign as two matmuls (dupr/roi_align.py) against torchvision's kernel."""

import pytest
import torch
from torchvision.ops import roi_align

from dupr.roi_align import roi_align_rows


def boxes_of_every_kind(n: int, size: float, g: torch.Generator) -> torch.Tensor:
    """Boxes inside the map, thinner than a cell, past its edges, and outside it entirely."""
    xy = torch.rand(n, 2, generator=g) * size * 1.2 - 0.1 * size
    wh = torch.rand(n, 2, generator=g) * size
    wh[: n // 4] *= 0.02  # thinner than one cell
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[n // 4 : n // 4 + 2] = torch.tensor(
        [[-40.0, -40.0, -20.0, -25.0], [0.0, 0.0, size, size]]
    )
    return boxes


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("h, w", [(9, 13), (11, 11)])  # square maps: both axes in one call
def test_matmul_roi_align_equals_torchvisions(aligned, sampling_ratio, channels_last, h, w):
    g = torch.Generator().manual_seed(sampling_ratio)
    n, c, stride, s = 24, 5, 16, 7
    feat = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    boxes = boxes_of_every_kind(n, stride * max(h, w), g).double()
    feat_tv, feat_mm = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    rois = torch.cat([torch.arange(n, dtype=boxes.dtype)[:, None], boxes], 1)
    want = roi_align(feat_tv, rois, s, 1 / stride, sampling_ratio, aligned)  # (N, C, S, S)
    got = roi_align_rows(feat_mm, boxes, s, 1 / stride, sampling_ratio, aligned)  # (N, S, S, C)
    assert got.shape == (n, s, s, c) and got.dtype == feat.dtype
    assert torch.allclose(got.permute(0, 3, 1, 2), want, atol=1e-9)
    upstream = torch.randn(n, c, s, s, generator=g, dtype=torch.float64)
    (want * upstream).sum().backward()
    (got.permute(0, 3, 1, 2) * upstream).sum().backward()
    assert torch.allclose(feat_mm.grad, feat_tv.grad, atol=1e-9)


def test_matmul_roi_align_keeps_a_bfloat16_map_in_bfloat16_within_its_rounding():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 16, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    boxes = boxes_of_every_kind(8, 224.0, g)
    rois = torch.cat([torch.arange(8.0)[:, None], boxes], 1)
    want = roi_align(feat, rois, 14, 1 / 16, 2, False).permute(0, 2, 3, 1)
    got = roi_align_rows(feat.bfloat16(), boxes, 14, 1 / 16, 2)
    assert got.dtype == torch.bfloat16
    # bf16 map, weights and output, each rounded to 8 bits of mantissa: about 1 % of the scale.
    assert (got.float() - want).abs().max() <= 0.03 * want.abs().max()


def test_matmul_roi_align_needs_a_fixed_sampling_grid():
    with pytest.raises(ValueError, match="sampling_ratio=0"):
        roi_align_rows(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2, 1.0, 0)
