"""Patch correspondence between two augmented views (§4.6.2, Fig. 7).

Each feature cell of view 1 is matched to the most cosine-similar cell of view 2; the match is
right when it lands on (or within ``tolerance_cells`` of) the view-2 cell that sees the same
point of the original image. The paper shows the matches qualitatively; we also count them, both
exactly (the true cell) and within one cell (a neighbour of it), per level: at small scale the
grids are coarse (conv5 of a 96-pixel view is 3×3), where within-one alone says little.

Geometry. A torchvision ResNet cell o at stride s is centred on view pixel s·o (continuous
coordinate s·o + 0.5, pixel k covering [k, k+1) as in `dupr.geometry`); tests/test_geometry.py
checks this. The grid therefore is not symmetric under a horizontal flip: the mirror image of
cell o's centre lies one view pixel from cell G − o, not on cell G − 1 − o (s − 1 pixels away).
`true_correspondence` follows the geometry exactly, so with identical crops, one flipped, cell
o corresponds to G − o (and view-1 cell 0 to the last cell, the nearest one inside the grid).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dupr.config import LEVELS, STRIDES, AugmentConfig
from dupr.geometry import to_original, to_view
from dupr.photometric import IMAGENET_MEAN, IMAGENET_STD
from dupr.views import TwoViews


def grid_size(size: int, stride: int) -> int:
    """Cells per side of a torchvision ResNet map at ``stride`` for a size×size input.

    Every stride-2 step (7×7 conv, max-pool, stride-2 3×3/1×1 convs, all padded as torchvision
    does) maps n to ceil(n / 2), so the map has ceil(size / stride) cells per side.
    """
    return -(-size // stride)


def _as_crop(crop: Tensor, name: str) -> Tensor:
    crop = torch.as_tensor(crop, dtype=torch.float64).reshape(-1)
    if crop.shape != (5,) or crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError(f"{name}={crop.tolist()}: expected a crop record [x1, y1, x2, y2, flip]")
    return crop[None]


def cell_centres(size: int, stride: int) -> Tensor:
    """View coordinates (G*G, 2) of the cell centres s·o + 0.5, row-major (index = row·G + col)."""
    g = grid_size(size, stride)
    c = torch.arange(g, dtype=torch.float64) * stride + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def true_correspondence(
    crop1: Tensor, crop2: Tensor, size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """For each view-1 cell, the view-2 cell nearest to the same original-image point.

    Returns ``(target_index, valid)``, both (G*G,) with G = `grid_size`: row-major indices into
    the view-2 grid, and whether the point lies inside view 2 at all (only those cells count).
    """
    c1, c2 = _as_crop(crop1, "crop1"), _as_crop(crop2, "crop2")
    g = grid_size(size, stride)
    orig = to_original(cell_centres(size, stride)[None], c1, size)[0]  # (G*G, 2)
    # Points as zero-size boxes, so that the view map (and its flip) is dupr.geometry's own.
    uv = to_view(torch.cat([orig, orig], dim=1), c2.expand(len(orig), -1), size)[:, :2]
    valid = ((uv >= 0) & (uv < size)).all(dim=1)
    # Nearest cell centre s·o + 0.5 per axis (the grid is separable), clamped into the grid.
    cell = torch.floor((uv - 0.5) / stride + 0.5).long().clamp(0, g - 1)
    return cell[:, 1] * g + cell[:, 0], valid


def match_patches(feat1: Tensor, feat2: Tensor) -> Tensor:
    """For each view-1 cell (row-major) the index of the most cosine-similar view-2 cell."""
    if feat1.dim() != 3 or feat2.dim() != 3 or feat1.shape[0] != feat2.shape[0]:
        raise ValueError(
            f"feat1 {tuple(feat1.shape)}, feat2 {tuple(feat2.shape)}: expected (C, G, G) maps"
        )
    f1 = F.normalize(feat1.flatten(1), dim=0)
    f2 = F.normalize(feat2.flatten(1), dim=0)
    return (f1.T @ f2).argmax(dim=1)


@dataclass
class _Matches:
    matches: Tensor
    target: Tensor
    valid: Tensor
    distance: Tensor  # Chebyshev distance in cells from each match to its true cell
    tolerance_cells: int
    # The same for the content-blind baseline that matches each cell to the view-2 cell at the
    # same grid position (its distance to the true cell).
    same_position_distance: Tensor

    @property
    def correct(self) -> Tensor:
        return self.within(self.tolerance_cells)

    def within(self, cells: int) -> Tensor:
        return self.valid & (self.distance <= cells)

    def same_position_within(self, cells: int) -> Tensor:
        return self.valid & (self.same_position_distance <= cells)


def _evaluate(
    feat1: Tensor,
    feat2: Tensor,
    crop1: Tensor,
    crop2: Tensor,
    size: int,
    stride: int,
    tolerance_cells: int,
) -> _Matches:
    g = grid_size(size, stride)
    for name, f in (("feat1", feat1), ("feat2", feat2)):
        if f.dim() != 3 or tuple(f.shape[1:]) != (g, g):
            raise ValueError(
                f"{name} {tuple(f.shape)}: expected (C, {g}, {g}) for size {size}, stride {stride}"
            )
    target, valid = true_correspondence(crop1, crop2, size, stride)
    matches = match_patches(feat1, feat2).cpu()
    return _Matches(
        matches,
        target,
        valid,
        _chebyshev(matches, target, g),
        tolerance_cells,
        _chebyshev(torch.arange(g * g), target, g),
    )


def _chebyshev(a: Tensor, b: Tensor, g: int) -> Tensor:
    """Chebyshev distance in cells between row-major indices of a g×g grid."""
    return torch.maximum((a // g - b // g).abs(), (a % g - b % g).abs())


def correspondence_accuracy(
    feat1: Tensor,
    feat2: Tensor,
    crop1: Tensor,
    crop2: Tensor,
    size: int,
    stride: int,
    tolerance_cells: int = 1,
) -> tuple[float, int]:
    """Top-1 matching accuracy over the view-1 cells whose point is inside view 2.

    A match is right within ``tolerance_cells`` (Chebyshev) of the true cell. Returns
    ``(accuracy, num_valid)``; accuracy is nan when the views do not overlap.
    """
    m = _evaluate(feat1, feat2, crop1, crop2, size, stride, tolerance_cells)
    n = int(m.valid.sum())
    return (float(m.correct.sum()) / n if n else float("nan")), n


@dataclass
class CorrespondenceResult:
    """Accuracies over all pairs, and the first pair with its matches for `plot_correspondence`.

    ``accuracy`` counts a match within ``tolerance_cells`` (what the plot colours green);
    ``exact`` and ``within_one`` are the same count at 0 and 1 cells, whatever the tolerance.
    ``same_position_exact`` and ``same_position_within_one`` score a content-blind baseline
    that matches every cell to the view-2 cell at the same grid position, on the same pairs:
    on coarse grids with overlapping crops it is right often, so a backbone's accuracy means
    something only above it.
    """

    accuracy: float
    exact: float
    within_one: float
    same_position_exact: float
    same_position_within_one: float
    num_valid: int
    num_pairs: int
    size: int
    stride: int
    tolerance_cells: int
    view1: Tensor  # normalised (3, size, size)
    view2: Tensor
    crop1: Tensor
    crop2: Tensor
    matches: Tensor  # (G*G,) view-2 index per view-1 cell
    target: Tensor
    valid: Tensor
    correct: Tensor


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def patch_correspondence_levels(
    backbone: nn.Module,
    images: list[Image.Image],
    image_size: int = 448,
    levels: Sequence[int] = (2, 3),
    pairs_per_image: int = 1,
    seed: int = 0,
    tolerance_cells: int = 1,
    augment: AugmentConfig | None = None,
) -> dict[str, CorrespondenceResult]:
    """Fig. 7 as numbers on several levels at once, keyed "conv2".."conv5" (conv4, conv5 default).

    Views come from the pre-training augmentation (`dupr.views.TwoViews`, MoCo v2 by default) at
    448 pixels as in the paper (pass the pre-training size for a small model: the views it learnt
    on). Every level sees the same pairs from one forward pass, so the levels compare directly;
    accuracies are averaged over all valid cells of all pairs. The global CPU generator is
    seeded inside a fork, so the caller's random state is left untouched.
    """
    levels = tuple(levels)
    if not levels or any(not 0 <= m < len(LEVELS) for m in levels):
        raise ValueError(
            f"levels={levels}: expected a non-empty subset of 0..{len(LEVELS) - 1} "
            f"({', '.join(LEVELS)})"
        )
    if not images:
        raise ValueError("images: empty list")
    device = _device(backbone)
    # Normalised views from the loader-side colour steps, whichever side pre-training used.
    views = TwoViews(
        image_size, dataclasses.replace(augment or AugmentConfig(), photometric_on="loader")
    )
    backbone.eval()
    first: dict[int, tuple] = {}
    # Per level: matches on the true cell, within one cell, within the tolerance; valid cells;
    # the same-position baseline on the true cell and within one cell.
    counts = {m: torch.zeros(6, dtype=torch.long) for m in levels}
    pairs = 0
    with torch.random.fork_rng(devices=[]):
        # The views draw from the CPU generator; torch.manual_seed would reseed every CUDA
        # device's too, which fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(seed)
        for image in images:
            for _ in range(pairs_per_image):
                pair = views(image.convert("RGB"))
                v1, v2, c1, c2 = (pair[k] for k in ("view1", "view2", "crop1", "crop2"))
                maps = backbone(torch.stack([v1, v2]).to(device), up_to=max(levels))
                for m in levels:
                    feat = maps[m].float()
                    r = _evaluate(feat[0], feat[1], c1, c2, image_size, STRIDES[m], tolerance_cells)
                    hits = [r.within(0), r.within(1), r.correct, r.valid]
                    hits += [r.same_position_within(0), r.same_position_within(1)]
                    counts[m] += torch.stack([h.sum() for h in hits]).long()
                    first.setdefault(m, (v1, v2, c1, c2, r))
                pairs += 1
    return {
        LEVELS[m]: _result(first[m], counts[m], pairs, image_size, STRIDES[m], tolerance_cells)
        for m in levels
    }


def _result(
    first: tuple, counts: Tensor, pairs: int, size: int, stride: int, tolerance_cells: int
) -> CorrespondenceResult:
    v1, v2, c1, c2, m = first
    exact, within_one, correct, valid, same_exact, same_within_one = counts.tolist()

    def rate(n: int) -> float:
        return n / valid if valid else float("nan")

    return CorrespondenceResult(
        accuracy=rate(correct),
        exact=rate(exact),
        within_one=rate(within_one),
        same_position_exact=rate(same_exact),
        same_position_within_one=rate(same_within_one),
        num_valid=valid,
        num_pairs=pairs,
        size=size,
        stride=stride,
        tolerance_cells=tolerance_cells,
        view1=v1,
        view2=v2,
        crop1=c1,
        crop2=c2,
        matches=m.matches,
        target=m.target,
        valid=m.valid,
        correct=m.correct,
    )


def patch_correspondence(
    backbone: nn.Module,
    images: list[Image.Image],
    image_size: int = 448,
    level: int = 2,
    pairs_per_image: int = 1,
    seed: int = 0,
    tolerance_cells: int = 1,
    augment: AugmentConfig | None = None,
) -> CorrespondenceResult:
    """Fig. 7 as a number on one level, conv4 by default (`patch_correspondence_levels`)."""
    if not 0 <= level < len(LEVELS):
        raise ValueError(f"level={level}: expected 0..{len(LEVELS) - 1} ({', '.join(LEVELS)})")
    by_level = patch_correspondence_levels(
        backbone, images, image_size, (level,), pairs_per_image, seed, tolerance_cells, augment
    )
    return by_level[LEVELS[level]]


def _unnormalise(view: Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (view.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_correspondence(
    result: CorrespondenceResult, path: str | Path, max_lines: int = 60
) -> None:
    """Fig. 7: both views side by side, lines from view-1 cells to their matches.

    Green lines are right matches (within the tolerance), red wrong ones; only cells whose point
    is inside view 2 are drawn, an evenly spaced subset of at most ``max_lines``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size, stride = result.size, result.stride
    g = grid_size(size, stride)
    gap = max(8, size // 32)
    img1, img2 = _unnormalise(result.view1), _unnormalise(result.view2)
    canvas = np.ones((size, 2 * size + gap, 3), dtype=np.float32)
    canvas[:, :size], canvas[:, size + gap :] = img1, img2

    # Figure + Agg canvas, not pyplot: no display and no global backend switch.
    fig = Figure(figsize=(10, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(canvas)
    cells = torch.nonzero(result.valid).flatten()
    if len(cells) > max_lines:
        cells = cells[torch.linspace(0, len(cells) - 1, max_lines).round().long()]
    for i in cells.tolist():
        j = int(result.matches[i])
        # imshow puts the centre of pixel k at k: cell o is drawn at s·o.
        x1, y1 = stride * (i % g), stride * (i // g)
        x2, y2 = size + gap + stride * (j % g), stride * (j // g)
        colour = "limegreen" if bool(result.correct[i]) else "red"
        ax.plot([x1, x2], [y1, y2], color=colour, linewidth=0.8, alpha=0.8)
        ax.plot([x1, x2], [y1, y2], "o", color=colour, markersize=2)
    ax.set_axis_off()
    ax.set_title(
        f"{LEVELS[STRIDES.index(stride)]} matches: {result.exact:.1%} on the true cell, "
        f"{result.within_one:.1%} within one (green: within {result.tolerance_cells})"
    )
    fig.tight_layout()
    fig.savefig(Path(path), format="png", dpi=100)
