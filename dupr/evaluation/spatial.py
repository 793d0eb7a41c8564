"""Spatial sensitivity of a backbone's features: the IoU–similarity curve of §4.6.1 (Fig. 6).

For a ground-truth box, q is its RoIAlign feature on one level (conv4 in the paper) and k_α the
feature of a RoI whose IoU with the box is α. Eq. 9 averages the cosine similarity of the S×S
positions. Features that are spatially sensitive give a steep Sim(α) curve: high similarity for
well-aligned RoIs, low for poorly aligned ones; the paper compares the curves' slopes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou, roi_align

from dupr.config import LEVELS, STRIDES
from dupr.evaluation.stats import estimate
from dupr.photometric import IMAGENET_MEAN, IMAGENET_STD

# rois_at_ious stops drawing once every target is hit within this IoU distance; the curve uses
# the IoUs actually reached, so the tolerance only affects how evenly [0, 1] is covered.
IOU_TOLERANCE = 0.05
_CANDIDATES_PER_ROUND = 1024
_MAX_ROUNDS = 8
# RoIAlign sampling as in the patch head (dupr.config.ModelConfig.roi_sampling_ratio).
_SAMPLING_RATIO = 2


def to_input(image: Image.Image, size: int | None = None) -> Tensor:
    """Normalised (ImageNet mean/std) float tensor (3, H, W) of a PIL image, as the backbone expects.

    With ``size`` the shorter side is resized to it (aspect kept); boxes in the original image
    must then be multiplied by ``size / min(W, H)``.
    """
    steps: list[Any] = [T.Resize(size, antialias=True)] if size is not None else []
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)(image.convert("RGB"))


def eq9_similarity(q: Tensor, k: Tensor) -> Tensor:
    """Eq. 9: mean over the S×S positions of the cosine similarity of the position features.

    q, k: (C, S, S) or (N, C, S, S) (broadcast against each other). Returns a scalar or (N,).
    Computed in float64 so that identical features give 1.0 up to rounding of the input dtype.
    """
    if q.dim() not in (3, 4) or k.dim() not in (3, 4):
        raise ValueError(f"eq9_similarity: expected (C,S,S) or (N,C,S,S), got {tuple(q.shape)}")
    if q.shape[-3:] != k.shape[-3:]:
        raise ValueError(f"eq9_similarity: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    qn = F.normalize(q.double(), dim=-3)
    kn = F.normalize(k.double(), dim=-3)
    sim = (qn * kn).sum(dim=-3).mean(dim=(-2, -1))
    return sim.to(torch.promote_types(q.dtype, k.dtype))


def _check_box(box: Tensor, name: str) -> None:
    if box.shape != (4,) or not torch.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"{name}={box.tolist()}: expected a finite xyxy box with x1<x2, y1<y2")


def _clip(box: Tensor, image_w: float, image_h: float) -> Tensor:
    x = box[..., 0::2].clamp(0, image_w)
    y = box[..., 1::2].clamp(0, image_h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def rois_at_ious(
    gt_box: Tensor,
    targets: Tensor,
    image_w: float,
    image_h: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One RoI per target IoU: random jitter of ``gt_box`` clipped to the image.

    Candidates are the GT box with a random shift (up to 1.5 box sizes), width and height scales
    (1/5 to 5) and so aspect ratio, all multiplied by one random jitter strength per candidate
    so that near-identical and far-off boxes are both common. Rounds of candidates are drawn
    until every target has one within ``IOU_TOLERANCE`` (at most ``_MAX_ROUNDS`` rounds); each
    target keeps its closest candidate. Low IoUs may stay out of reach when the GT box fills the
    image (the smallest box inside reaches about 1/25). Returns (boxes (n, 4), their IoUs (n,)).
    """
    gt = gt_box.detach().double().cpu()
    _check_box(gt, "gt_box")
    targets = targets.detach().double().cpu().flatten()
    if ((targets < 0) | (targets > 1)).any():
        raise ValueError(f"targets={targets.tolist()}: IoU targets must lie in [0, 1]")
    gt = _clip(gt, image_w, image_h)
    _check_box(gt, "gt_box (clipped to the image)")
    cx, cy = (gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2
    w, h = gt[2] - gt[0], gt[3] - gt[1]
    n = len(targets)
    best = torch.zeros(n, 4, dtype=torch.float64)
    best_iou = torch.full((n,), -1.0, dtype=torch.float64)
    for _ in range(_MAX_ROUNDS):
        r = torch.rand(_CANDIDATES_PER_ROUND, 5, generator=generator, dtype=torch.float64)
        strength = r[:, 0:1]
        shift = strength * (2 * r[:, 1:3] - 1) * 1.5
        scale = torch.exp(strength * (2 * r[:, 3:5] - 1) * np.log(5.0))
        ncx, ncy = cx + shift[:, 0] * w, cy + shift[:, 1] * h
        nw, nh = w * scale[:, 0], h * scale[:, 1]
        cand = torch.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], dim=1)
        cand = _clip(cand, image_w, image_h)
        keep = ((cand[:, 2] - cand[:, 0]) >= 1) & ((cand[:, 3] - cand[:, 1]) >= 1)
        cand = cand[keep]
        if len(cand) == 0:
            continue
        ious = box_iou(gt[None], cand)[0]
        pick = (ious[None, :] - targets[:, None]).abs().argmin(dim=1)
        better = (ious[pick] - targets).abs() < (best_iou - targets).abs()
        best[better], best_iou[better] = cand[pick[better]], ious[pick[better]]
        if ((best_iou - targets).abs() <= IOU_TOLERANCE).all():
            break
    dtype = gt_box.dtype if gt_box.is_floating_point() else torch.float32
    return best.to(dtype), best_iou.to(torch.float32)


@dataclass
class SpatialResult:
    """Points (IoU, Sim) of the Fig. 6 analysis, their binned means and the fitted slope."""

    ious: np.ndarray
    sims: np.ndarray
    bin_edges: np.ndarray
    bin_means: np.ndarray  # nan for empty bins
    bin_counts: np.ndarray
    slope: float  # least-squares slope of Sim on IoU over all points (the paper compares slopes)

    def as_rows(self) -> list[dict[str, float]]:
        """One row per IoU bin, for tables and CSV."""
        return [
            {
                "iou_low": float(lo),
                "iou_high": float(hi),
                "count": int(c),
                "mean_sim": float(m),
            }
            for lo, hi, c, m in zip(
                self.bin_edges[:-1],
                self.bin_edges[1:],
                self.bin_counts,
                self.bin_means,
                strict=True,
            )
        ]


def summarise(ious: np.ndarray, sims: np.ndarray, bins: int = 10) -> SpatialResult:
    """Bin the points over [0, 1] (the last bin includes IoU = 1) and fit the slope."""
    ious, sims = np.asarray(ious, dtype=np.float64), np.asarray(sims, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(ious, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    sums = np.bincount(idx, weights=sims, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    slope = float(np.polyfit(ious, sims, 1)[0]) if len(np.unique(ious)) > 1 else float("nan")
    return SpatialResult(ious, sims, edges, means, counts, slope)


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def iou_similarity(
    backbone: nn.Module,
    images: list[Tensor],
    gt_boxes: list[Tensor],
    level: int = 2,
    roi_size: int = 7,
    rois_per_box: int = 20,
    bins: int = 10,
    seed: int = 0,
) -> SpatialResult:
    """The IoU–similarity points of §4.6.1 for every GT box of every image.

    images: normalised (3, H, W) tensors; gt_boxes: (N_i, 4) xyxy boxes in those images' pixels.
    q is the RoIAlign of the GT box on level ``level`` (conv4 = 2, as the paper), k_α those of
    ``rois_per_box`` RoIs with target IoUs evenly spaced over [0, 1]; Sim is Eq. 9. RoIAlign
    uses aligned=False, the flag that matches torchvision ResNet cell centres (dupr.heads).
    """
    if not 0 <= level < len(LEVELS):
        raise ValueError(f"level={level}: expected 0..{len(LEVELS) - 1} ({', '.join(LEVELS)})")
    if len(images) != len(gt_boxes):
        raise ValueError(f"gt_boxes: {len(gt_boxes)} entries for {len(images)} images")
    stride = STRIDES[level]
    device = _device(backbone)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.linspace(0.0, 1.0, rois_per_box, dtype=torch.float64)
    all_ious: list[Tensor] = []
    all_sims: list[Tensor] = []
    backbone.eval()
    for i, (image, boxes) in enumerate(zip(images, gt_boxes, strict=True)):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected a (3, H, W) tensor, got {tuple(image.shape)}")
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if len(boxes) == 0:
            continue
        h, w = image.shape[1:]
        feat = backbone(image[None].to(device), up_to=level)[level].float()
        rois, ious = [], []
        for j, box in enumerate(boxes):
            _check_box(box, f"gt_boxes[{i}][{j}]")
            cand, iou = rois_at_ious(box, targets, w, h, generator)
            rois.append(torch.cat([_clip(box, w, h)[None], cand.float()]))
            ious.append(iou)
        stacked = torch.cat(rois).to(device)
        pooled = roi_align(
            feat,
            [stacked],
            output_size=roi_size,
            spatial_scale=1.0 / stride,
            sampling_ratio=_SAMPLING_RATIO,
            aligned=False,
        ).view(len(boxes), rois_per_box + 1, -1, roi_size, roi_size)
        q = pooled[:, :1].expand(-1, rois_per_box, -1, -1, -1).flatten(0, 1)
        k = pooled[:, 1:].flatten(0, 1)
        all_sims.append(eq9_similarity(q, k).cpu())
        all_ious.append(torch.cat(ious))
    if not all_ious:
        raise ValueError("gt_boxes: no boxes in any image")
    return summarise(torch.cat(all_ious).numpy(), torch.cat(all_sims).double().numpy(), bins)


def plot_iou_similarity(
    curves: Mapping[str, SpatialResult | Sequence[SpatialResult]], path: str | Path
) -> None:
    """Fig. 6 (b): binned mean Sim against IoU per curve, over a faint scatter of the points.

    A curve given as several results (one per seed) is drawn as the mean over seeds of each
    bin's mean, with its 95 % interval as error bars, and the mean slope in the legend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas, not pyplot: no display and no global backend switch.
    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, given in curves.items():
        runs = [given] if isinstance(given, SpatialResult) else list(given)
        first = runs[0]
        centres = (first.bin_edges[:-1] + first.bin_edges[1:]) / 2
        per_bin = [estimate(r.bin_means[b] for r in runs) for b in range(len(centres))]
        means = np.array([e.mean for e in per_bin])
        slope = estimate(r.slope for r in runs)
        shown = f"{name} (slope {slope.mean:.2f}" + (
            f", {len(runs)} seeds)" if len(runs) > 1 else ")"
        )
        if len(runs) > 1:
            err = np.array([(e.high - e.mean) if e.has_interval else np.nan for e in per_bin])
            line, *_ = ax.errorbar(centres, means, yerr=err, marker="o", capsize=3, label=shown)
        else:
            (line,) = ax.plot(centres, means, marker="o", label=shown)
        for r in runs:
            ax.scatter(r.ious, r.sims, s=4, alpha=0.15 / len(runs), color=line.get_color())
    ax.set_xlabel("IoU with ground truth")
    ax.set_ylabel("Sim (Eq. 9)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(Path(path), format="png", dpi=120)
