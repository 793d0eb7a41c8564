"""Per-level linear probe of frozen features (§4.5.1, Table VI b).

The paper measures how well each level conv2..conv5 classifies by training an SVM on frozen,
globally pooled features (VOC07 classification, following Goyal et al. [61]). We do the same on
any labelled image folder: one multi-class linear SVM per level, top-1 accuracy on a held-out
set. (The paper's VOC07 protocol trains one binary SVM per class and reports mAP; here the
classes are exclusive, so one-vs-rest LinearSVC with accuracy is the direct equivalent.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from dupr.config import LEVELS
from dupr.evaluation.stats import Estimate
from dupr.photometric import IMAGENET_MEAN, IMAGENET_STD

# Share of the training set held out to pick C when a grid of values is given.
HOLDOUT_FRACTION = 0.2


def probe_transform(image_size: int) -> T.Compose:
    """Deterministic evaluation transform: shorter side to ``image_size``, centre crop, normalise."""
    return T.Compose(
        [
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def pooled_features(
    backbone: nn.Module,
    loader: Iterable,
    levels: Sequence[int] = (0, 1, 2, 3),
    device: str | torch.device = "cpu",
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Frozen features, global-average pooled per level: ({level: (N, C_level)}, labels (N,))."""
    levels = _check_levels(levels)
    backbone.eval().to(device)
    feats: dict[int, list[np.ndarray]] = {m: [] for m in levels}
    labels: list[np.ndarray] = []
    for images, targets in loader:
        maps = backbone(images.to(device), up_to=max(levels))
        for m in levels:
            feats[m].append(maps[m].float().mean(dim=(2, 3)).cpu().numpy())
        labels.append(np.asarray(torch.as_tensor(targets).cpu()))
    if not labels:
        raise ValueError("loader: yielded no batches")
    return {m: np.concatenate(f) for m, f in feats.items()}, np.concatenate(labels)


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels or any(not 0 <= m < len(LEVELS) for m in levels):
        raise ValueError(f"levels={levels}: expected a non-empty subset of 0..{len(LEVELS) - 1}")
    return levels


def _fit_score(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, c: float
) -> float:
    # Standardising first makes one C fit every level, whose feature scales differ a lot.
    # A linear SVM (max-margin, convex, deterministic) as in the paper's VOC07 protocol [61]:
    # no learning-rate schedule to tune per level, unlike an SGD-trained linear layer.
    # scikit-learn is imported here, not at the top: it takes about a second to import, and
    # every process that builds a pipeline's stages imports this module without fitting.
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    model = make_pipeline(StandardScaler(), LinearSVC(C=c, max_iter=10000))
    model.fit(train_x, train_y)
    return float(model.score(val_x, val_y))


def probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    C: float | Sequence[float] = 1.0,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on (val_x, val_y) of a linear SVM on standardised train features.

    With a sequence of C values, the best one on a held-out ``HOLDOUT_FRACTION`` of the training
    set (stratified when every class has two samples) is refitted on all of it.
    """
    train_x, val_x = np.asarray(train_x, np.float64), np.asarray(val_x, np.float64)
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"train_x {train_x.shape}, val_x {val_x.shape}: need (N, D) with equal D")
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError(
            f"labels: {len(train_y)}/{len(val_y)} for {len(train_x)}/{len(val_x)} rows"
        )
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"train_y: needs at least two classes, got {np.unique(train_y).tolist()}")
    grid = [float(C)] if isinstance(C, int | float | np.number) else [float(c) for c in C]
    if len(grid) > 1:
        from sklearn.model_selection import train_test_split  # see _fit_score

        _, counts = np.unique(train_y, return_counts=True)
        fit_x, held_x, fit_y, held_y = train_test_split(
            train_x,
            train_y,
            test_size=HOLDOUT_FRACTION,
            random_state=seed,
            stratify=train_y if counts.min() >= 2 else None,
        )
        if len(np.unique(fit_y)) < 2:
            raise ValueError("train_y: too few samples to hold out a part for choosing C")
        scores = [_fit_score(fit_x, fit_y, held_x, held_y, c) for c in grid]
        grid = [grid[int(np.argmax(scores))]]
    return _fit_score(train_x, train_y, val_x, val_y, grid[0])


def linear_probe(
    backbone: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    levels: Sequence[int] = (0, 1, 2, 3),
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    C: float | Sequence[float] = 1.0,
    num_workers: int = 0,
) -> dict[str, float]:
    """Table VI b: linear-SVM accuracy of each level's pooled features, keyed "conv2".."conv5".

    Datasets yield (normalised image tensor, label), e.g. torchvision's ImageFolder with
    `probe_transform`. Features of all levels come from one forward pass per batch.
    """
    levels = _check_levels(levels)
    results = []
    for dataset in (train_set, val_set):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        results.append(pooled_features(backbone, loader, levels, device))
    (train_f, train_y), (val_f, val_y) = results
    return {LEVELS[m]: probe_accuracy(train_f[m], train_y, val_f[m], val_y, C) for m in levels}


def plot_levels(accuracy: Mapping[str, Mapping[str, Estimate]], path: str | Path) -> None:
    """Table VI (b) as bars: the probe's accuracy per level for each initialisation, with the
    95 % interval over seeds as error bars (none for one seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(accuracy))
    x = np.arange(len(LEVELS))
    for i, (name, levels) in enumerate(accuracy.items()):
        found = [levels.get(level) for level in LEVELS]
        means = [e.mean * 100 if e else np.nan for e in found]
        err = [(e.high - e.mean) * 100 if e and e.has_interval else 0.0 for e in found]
        n = max((e.n for e in found if e), default=0)
        shown = name + (f" ({n} seeds)" if n > 1 else "")
        ax.bar(
            x + (i - (len(accuracy) - 1) / 2) * width,
            means,
            width,
            yerr=err,
            capsize=3,
            label=shown,
        )
    ax.set_xticks(x, list(LEVELS))
    ax.set_ylabel("linear probe accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    if accuracy:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(Path(path), format="png", dpi=120)
