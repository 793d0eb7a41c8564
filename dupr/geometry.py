"""Where the two views overlap: the intersection B of the crops and its image in each view.

A view's crop is a float row ``[x1, y1, x2, y2, flip]``: the rectangle R_v it covers in the
ORIGINAL image, in continuous pixel coordinates (edges, so a crop of ``w`` pixels starting at
column ``j`` is ``[j, j + w]``), and whether the view was mirrored horizontally. Each view is a
``size × size`` image, so the map T_v from original to view coordinates is

    u = (x - x1) · size / (x2 - x1),   v = (y - y1) · size / (y2 - y1),   u ← size - u if flipped.

All functions are batched over the first dimension and run on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def intersection(crop1: Tensor, crop2: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 3–4: B = R1 ∩ R2 in original coordinates, and whether it is non-empty.

    Returns ``(B, overlaps)`` with B of shape (N, 4) and overlaps a bool (N,). For pairs that do
    not overlap B is degenerate (x1 >= x2 or y1 >= y2) and must not be used.
    """
    tl = torch.maximum(crop1[:, 0:2], crop2[:, 0:2])
    br = torch.minimum(crop1[:, 2:4], crop2[:, 2:4])
    box = torch.cat([tl, br], dim=1)
    overlaps = (br > tl).all(dim=1)
    return box, overlaps


def to_view(box: Tensor, crop: Tensor, size: int) -> Tensor:
    """T_v(box): map original-image boxes (N, 4) into view coordinates (N, 4).

    For a flipped view the mirrored box is returned with x1 < x2 (RoIAlign needs that), so the
    region is the right one but its left-right order is reversed: a pooled S×S grid from it must
    be mirrored back (see `unflip_grid`).
    """
    corners = box.reshape(-1, 2, 2)  # [[x1, y1], [x2, y2]]
    scale = size / (crop[:, 2:4] - crop[:, 0:2])  # (N, 2): x and y
    uv = (corners - crop[:, None, 0:2]) * scale[:, None]
    # Mirrored: u ← size − u, and the left and right edges trade places.
    mirrored = torch.stack([size - uv[:, :, 0].flip(1), uv[:, :, 1]], dim=2)
    flipped = (crop[:, 4] > 0.5)[:, None, None]
    return torch.where(flipped, mirrored, uv).flatten(1)


def to_original(points: Tensor, crop: Tensor, size: int) -> Tensor:
    """Inverse of T_v for points (N, P, 2) in view coordinates; used by tests and evaluations."""
    u, v = points[..., 0], points[..., 1]
    flipped = (crop[:, 4] > 0.5)[:, None]
    u = torch.where(flipped, size - u, u)
    x = crop[:, 0:1] + u * (crop[:, 2:3] - crop[:, 0:1]) / size
    y = crop[:, 1:2] + v * (crop[:, 3:4] - crop[:, 1:2]) / size
    return torch.stack([x, y], dim=-1)


def view_boxes(crop1: Tensor, crop2: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """B1 = T1(B) and B2 = T2(B) in each view's pixels, and the overlap flag per pair.

    Pairs without overlap get the whole view as a stand-in box so that RoIAlign stays valid;
    their patch loss is masked out by the flag.
    """
    box, overlaps = intersection(crop1, crop2)
    # Both views in one call (half the small kernels to launch). The stand-in is filled on the
    # device: a tensor made from host values (`new_tensor([0, 0, size, size])`) is a blocking
    # host-to-device copy, which made the host wait for the GPU every step.
    boxes = to_view(box.repeat(2, 1), torch.cat([crop1, crop2]), size)
    whole = torch.zeros_like(boxes)
    whole[:, 2:].fill_(float(size))
    b1, b2 = torch.where(overlaps.repeat(2)[:, None], boxes, whole).chunk(2)
    return b1, b2, overlaps


def shortest_side(box1: Tensor, box2: Tensor) -> Tensor:
    """The shortest side of each pair's view boxes (N, 4) in either view, in view pixels.

    A pair's patches are positives at a level only where B spans at least one of its cells
    (`stride` pixels) in both views, i.e. where this is >= the level's stride: RoIAlign with
    aligned=False widens a thinner RoI to one cell from its top-left corner; in a flipped view
    that corner is the other side of B, and the two views' scales differ, so the two pooled
    grids would cover different parts of the image.
    """
    return torch.minimum(box1[:, 2:] - box1[:, :2], box2[:, 2:] - box2[:, :2]).amin(dim=1)


def unflip_grid(grid: Tensor, crop: Tensor) -> Tensor:
    """Mirror pooled (N, C, S, S) grids of flipped views back along the width.

    After this, cell (i, j) of both views covers the same region of the original image: the
    positive pairs of Eq. 7 are then simply the same cell index.
    """
    flipped = (crop[:, 4] > 0.5).view(-1, 1, 1, 1)
    return torch.where(flipped, grid.flip(-1), grid)
