"""Object-level linear probe: classify ground-truth boxes from frozen RoI features, per level.

The paper's claim is that DUPR learns region-level features at every level (§3.2, Table VI b
probes whole images). Detection fine-tuning at a demo budget is too noisy to show it, so this
probe asks the cheapest detection-relevant question instead: from a frozen backbone, RoIAlign
each ground-truth box of a detection set on conv2..conv5 (as the patch head g does, Eq. 5) and
fit a linear classifier on the train split's boxes; report its accuracy on the val split's.
The classifier is the per-level linear probe's (`dupr.evaluation.linear_probe.probe_accuracy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from dupr.config import LEVELS, STRIDES
from dupr.evaluation.linear_probe import _check_levels, probe_accuracy
from dupr.photometric import normalise

# RoIAlign sampling as in the patch head (dupr.config.ModelConfig.roi_sampling_ratio).
_SAMPLING_RATIO = 2


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _resize(image: Tensor, boxes: Tensor, size: int | None) -> tuple[Tensor, Tensor]:
    """Shorter side to ``size`` (aspect kept), boxes scaled with it; unchanged when None."""
    if size is None:
        return image, boxes
    scale = size / min(image.shape[1:])
    hw = [max(1, round(n * scale)) for n in image.shape[1:]]
    image = F.interpolate(image[None], size=hw, mode="bilinear", antialias=True)[0]
    return image, boxes * scale


class DetectionItems(Protocol):
    """Indexed (image, target) pairs: a `dupr.data.coco.CocoDetection`, or a Subset of one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]: ...


def box_features(
    backbone: nn.Module,
    dataset: DetectionItems,
    levels: Sequence[int] = (0, 1, 2, 3),
    roi_size: int = 2,
    image_size: int | None = None,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """RoIAlign features of every ground-truth box: ({level: (N, C·S·S)}, labels (N,)).

    Each box is pooled to ``roi_size``×``roi_size`` cells with aligned=False, the flag that
    matches torchvision ResNet cell centres (dupr.heads, Eq. 5), and flattened, so the probe
    sees the object's layout (its shape), not only its mean feature. With ``image_size`` the
    shorter image side is resized to it first (the pre-training resolution, say).
    """
    levels = _check_levels(levels)
    device = _device(backbone)
    feats: dict[int, list[Tensor]] = {m: [] for m in levels}
    labels: list[Tensor] = []
    backbone.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            image, target = dataset[i]
            if not len(target["boxes"]):
                continue
            image, boxes = _resize(normalise(image), target["boxes"].float(), image_size)
            maps = backbone(image[None].to(device), up_to=max(levels))
            for m in levels:
                pooled = roi_align(
                    maps[m].float(),
                    [boxes.to(device)],
                    output_size=roi_size,
                    spatial_scale=1.0 / STRIDES[m],
                    sampling_ratio=_SAMPLING_RATIO,
                    aligned=False,
                )
                feats[m].append(pooled.flatten(1).cpu())
            labels.append(target["labels"])
    if not labels:
        raise ValueError(f"{dataset!r}: no ground-truth boxes")
    return {m: torch.cat(f).double().numpy() for m, f in feats.items()}, torch.cat(labels).numpy()


def object_probe(
    backbone: nn.Module,
    train_set: DetectionItems,
    val_set: DetectionItems,
    levels: Sequence[int] = (0, 1, 2, 3),
    roi_size: int = 2,
    image_size: int | None = None,
    C: float | Sequence[float] = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of a linear classifier on each level's frozen box features, keyed "conv2"..

    Trained on the train split's ground-truth boxes, scored on the val split's; deterministic
    (no augmentation, the linear SVM of `probe_accuracy`; ``seed`` only picks the held-out part
    when ``C`` is a grid). Pass sets without flips (`CocoDetection`'s default hflip_prob=0).
    """
    levels = _check_levels(levels)
    train_x, train_y = box_features(backbone, train_set, levels, roi_size, image_size)
    val_x, val_y = box_features(backbone, val_set, levels, roi_size, image_size)
    return {
        LEVELS[m]: probe_accuracy(train_x[m], train_y, val_x[m], val_y, C, seed=seed)
        for m in levels
    }
