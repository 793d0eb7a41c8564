"""Views with boxes: the S×S cells of B1 and B2 must cover the same original-image points."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.ops import roi_align

from dupr.backbone import ResNetBackbone
from dupr.geometry import intersection, to_original, to_view, unflip_grid, view_boxes
from dupr.heads import PatchHead
from dupr.views import CropAndFlip


def coordinate_image(width: int = 256, height: int = 240) -> Image.Image:
    """Red = column index, green = row index: every pixel encodes where it is."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def cell_centres(box: torch.Tensor, s: int) -> torch.Tensor:
    """Centres (N, S*S, 2) of the S×S cells of boxes (N, 4), row-major."""
    t = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    x = box[:, 0:1] + t * (box[:, 2:3] - box[:, 0:1])
    y = box[:, 1:2] + t * (box[:, 3:4] - box[:, 1:2])
    gx = x[:, None, :].expand(-1, s, -1)
    gy = y[:, :, None].expand(-1, -1, s)
    return torch.stack([gx, gy], dim=-1).reshape(len(box), s * s, 2)


def test_intersection_by_hand():
    c1 = torch.tensor([[10.0, 20.0, 110.0, 140.0, 0.0]])
    c2 = torch.tensor([[50.0, 0.0, 200.0, 100.0, 1.0]])
    box, ok = intersection(c1, c2)
    assert ok.tolist() == [True]
    assert box.tolist() == [[50.0, 20.0, 110.0, 100.0]]


def test_non_overlapping_and_touching_views_are_flagged():
    c1 = torch.tensor([[0.0, 0.0, 50.0, 50.0, 0.0], [0.0, 0.0, 50.0, 50.0, 1.0]])
    c2 = torch.tensor(
        [[60.0, 0.0, 90.0, 50.0, 0.0], [50.0, 10.0, 90.0, 40.0, 0.0]]
    )  # apart; touching
    b1, b2, ok = view_boxes(c1, c2, size=32)
    assert ok.tolist() == [False, False]
    # Stand-in boxes stay valid for RoIAlign (x1 < x2) and are masked out by the flag.
    assert torch.equal(b1, torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2))
    assert torch.equal(b2, b1)


def test_view_mapping_round_trips_with_flip():
    g = torch.Generator().manual_seed(0)
    n, size = 200, 224
    xy = torch.rand(n, 2, generator=g) * 100
    wh = 20 + torch.rand(n, 2, generator=g) * 200
    flip = (torch.rand(n, 1, generator=g) < 0.5).float()
    crop = torch.cat([xy, xy + wh, flip], 1).double()
    box = torch.cat([xy + 0.25 * wh, xy + 0.75 * wh], 1).double()
    v = to_view(box, crop, size)
    assert (v[:, 0] < v[:, 2]).all() and (v[:, 1] < v[:, 3]).all()
    corners = torch.stack([v[:, [0, 1]], v[:, [2, 3]]], dim=1)
    back = to_original(corners, crop, size)
    xs = back[..., 0].sort(dim=1).values
    assert torch.allclose(xs, box[:, [0, 2]], atol=1e-9)
    assert torch.allclose(back[..., 1], box[:, [1, 3]], atol=1e-9)


@pytest.mark.parametrize("s", [1, 7, 14])
def test_cells_of_both_views_map_to_same_original_point(s):
    """Real crop/flip/resize on an image that encodes coordinates, pooled by RoIAlign."""
    torch.manual_seed(0)
    img = coordinate_image()
    size = 112
    geometric = CropAndFlip(size, scale=(0.2, 1.0))
    checked, flipped_pairs, worst = 0, 0, 0.0
    for _ in range(150):
        v1, c1 = geometric(img)
        v2, c2 = geometric(img)
        crops = torch.stack([c1, c2]).double()
        b1, b2, ok = view_boxes(crops[0:1], crops[1:2], size)
        if not ok.item():
            continue
        pooled = []
        for view, box, crop in ((v1, b1, crops[0:1]), (v2, b2, crops[1:2])):
            t = view.double()[None, :2]
            rois = torch.cat([torch.zeros(1, 1, dtype=torch.float64), box], 1)
            # On image pixels, `aligned=True` is the pixel-centre convention (pixel k covers [k, k+1)).
            grid = roi_align(t, rois, s, spatial_scale=1.0, sampling_ratio=2, aligned=True)
            pooled.append(unflip_grid(grid, crop).flatten(2)[0].T)  # (S*S, 2): encoded x, y
        # Encoded value k is the pixel whose centre is at k + 0.5.
        p1, p2 = pooled[0] + 0.5, pooled[1] + 0.5
        box_orig, _ = intersection(crops[0:1], crops[1:2])
        expected = cell_centres(box_orig, s)[0]
        worst = max(worst, (p1 - p2).abs().max().item(), (p1 - expected).abs().max().item())
        checked += 1
        flipped_pairs += int(c1[4] != c2[4])
    assert checked > 100 and flipped_pairs > 20
    assert worst <= 1.0, f"cells disagree by {worst:.2f} original pixels"


def test_flip_without_unmirroring_would_fail():
    """Guard for the test above: skipping `unflip_grid` puts mirrored cells side by side."""
    img = coordinate_image()
    crop = torch.tensor([[40.0, 40.0, 200.0, 200.0, 1.0]], dtype=torch.float64)
    view = img.crop((40, 40, 200, 200)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.asarray(view, dtype=np.float64)).permute(2, 0, 1)[None, :1]
    box = to_view(torch.tensor([[40.0, 40.0, 200.0, 200.0]], dtype=torch.float64), crop, 160)
    rois = torch.cat([torch.zeros(1, 1, dtype=torch.float64), box], 1)
    grid = roi_align(t, rois, 4, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert grid[0, 0, 0, 0] > grid[0, 0, 0, -1]  # still mirrored: x decreases along the row
    fixed = unflip_grid(grid, crop)
    assert fixed[0, 0, 0, 0] < fixed[0, 0, 0, -1]


def resnet_receptive_field_centre(level: int, stride: int) -> float:
    """Centroid of the input gradient of one central cell, for a ResNet-18 with positive weights.

    With positive weights, identity BatchNorm and average instead of max pooling (same geometry),
    every path from input to output counts equally, so the centroid is the geometric centre of
    the receptive field, in pixel-index units.
    """
    net = ResNetBackbone("resnet18").eval()
    net.maxpool = nn.AvgPool2d(3, 2, 1)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.fill_(0.01)
    size, cell = 512, 256 // stride
    x = torch.ones(1, 3, size, size, requires_grad=True)
    feats = net(x, up_to=level)
    feats[level][0, :, cell, cell].sum().backward()
    g = x.grad[0].sum(0)
    cols = torch.arange(size, dtype=torch.float64)
    centroid = (g.sum(0).double() * cols).sum() / g.sum()
    return centroid.item() - stride * cell  # offset of the centre from s·o, in pixel indices


@pytest.mark.parametrize("level,stride", [(2, 16), (3, 32)])
def test_roi_align_flag_matches_resnet_cell_centres(level, stride):
    """torchvision ResNet cell o is centred on pixel index s·o, i.e. continuous s·o + 0.5.

    RoIAlign with aligned=False reads cell o at continuous x = s·o: half a view pixel from the
    true centre. aligned=True reads it at s·o + s/2, (s − 1)/2 pixels off, in opposite directions
    for a flipped and an unflipped view. So the default must be aligned=False.
    """
    offset = resnet_receptive_field_centre(level, stride)
    assert abs(offset) < 1e-3
    true_centre = 0.5 + offset
    sampled_unaligned = 0.0  # x at which aligned=False samples cell o, relative to s·o
    sampled_aligned = stride / 2
    assert abs(sampled_unaligned - true_centre) <= 0.5 + 1e-3
    assert abs(sampled_aligned - true_centre) >= (stride - 1) / 2 - 1e-3
    assert PatchHead(8, 8, 8, roi_size=7, stride=stride).aligned is False


def test_patch_head_pool_on_feature_maps_agrees_across_views():
    """The model's own pooling, on maps whose cell o holds its centre s·o + 0.5."""
    torch.manual_seed(1)
    stride, size, s = 16, 224, 7
    head = PatchHead(2, 4, 4, roi_size=s, stride=stride)
    n = 64
    xy = torch.rand(n, 2) * 150
    wh = 150 + torch.rand(n, 2) * 250
    c1 = torch.cat([xy, xy + wh, (torch.rand(n, 1) < 0.5).float()], 1)
    c2 = c1.clone()
    c2[:, :4] += torch.randn(n, 4) * 30
    c2[:, 4] = (torch.rand(n) < 0.5).float()
    b1, b2, ok = view_boxes(c1, c2, size)
    assert ok.all()
    # Two extra cells beyond the view's edge keep the ramp linear where RoIAlign would clamp.
    o = torch.arange(size // stride + 2, dtype=torch.float32) * stride + 0.5
    fmap = torch.stack([o[None, :].expand(len(o), -1), o[:, None].expand(-1, len(o))])
    fmap = fmap[None].expand(n, -1, -1, -1).contiguous()
    orig = []
    for box, crop in ((b1, c1), (b2, c2)):
        # RoIAlign as the head runs it, un-mirrored as its forward does after g: (n, S*S, 2).
        grid = unflip_grid(head.pool(fmap, box).permute(0, 3, 1, 2), crop)
        grid = grid.flatten(2).transpose(1, 2)
        orig.append(to_original(grid.double(), crop.double(), size))
    # One view pixel, in original pixels, for the coarser of the two views.
    view_px = torch.maximum((c1[:, 2] - c1[:, 0]), (c2[:, 2] - c2[:, 0])).double() / size
    err = (orig[0] - orig[1]).abs().amax(dim=(1, 2))
    assert (err <= view_px + 1e-6).all()
