"""PASCAL VOC box AP as the paper reports it for VOC (§4.1): detectron2's PASCAL VOC evaluator.

That evaluator runs the VOC devkit's ``voc_eval`` for every IoU threshold t in 0.50:0.05:0.95
with the VOC2007 11-point interpolated AP, and reports AP (mean over thresholds of the mean over
classes), AP50 and AP75. It is not COCOeval: matching, interpolation and the IoU pixel
convention all differ, so the two give different numbers on the same detections.

Semantics reproduced here, per class:

- detections are ranked by descending score (a stable sort, so ties keep input order);
- each detection is compared with the ground truth of its image and class; the one of highest
  IoU is taken, whether or not it is already matched. If that IoU is strictly greater than t:
  a "difficult" ground truth makes the detection ignored (neither TP nor FP); otherwise it is a
  TP if that ground truth is still unmatched and a FP (duplicate) if it is matched. Anything
  else is a FP. Note that a duplicate is a FP even when another unmatched ground truth also
  overlaps it by more than t: that is the devkit's rule, kept for comparable numbers;
- "difficult" is the VOC ``difficult`` flag, and COCO's ``iscrowd`` is treated the same way;
  difficult ground truths do not count in the number of positives;
- classes without any (non-difficult) positive in ``gt`` are skipped. detectron2 averages over
  all 20 VOC classes, which all have positives in VOC test sets, so this changes nothing there;
  on small or partial sets it avoids averaging in an undefined AP as 0.

Pixel convention. The devkit measures boxes in 1-based inclusive pixel indices and adds 1 to
widths and heights. detectron2 loads VOC boxes as 0-based continuous ``[xmin - 1, ymin - 1,
xmax, ymax]`` and, to evaluate, shifts its boxes back to 1-based (``x1 + 1, y1 + 1``) before
calling the devkit. This module does the same with COCO ``[x, y, w, h]`` boxes: it converts them
to ``[x + 1, y + 1, x + w, y + h]`` and uses the devkit's +1 formula. The two +1s cancel, so the
IoU equals the plain continuous IoU of the COCO boxes (e.g. a 10×10 box in a 10×20 one has
IoU exactly 0.5, which does NOT pass t = 0.5).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from dupr.evaluation.coco_metrics import check_predictions

# detectron2's thresholds: 50, 55, ..., 95 percent.
IOU_THRESHOLDS = tuple(t / 100.0 for t in range(50, 100, 5))
VOC_METRICS = ("AP", "AP50", "AP75")  # the keys of `voc_metrics`

# The devkit's 11 recall levels, computed exactly as it does. np.arange accumulates rounding,
# so three levels sit just above 0.3, 0.6 and 0.7 (e.g. 0.30000000000000004): a recall of
# exactly 0.3 does not reach the "0.3" level. Kept as is to reproduce detectron2's numbers.
_RECALL_LEVELS = np.arange(0.0, 1.1, 0.1)


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over r in {0, 0.1, ..., 1} of max precision at recall >= r.

    A level that no recall reaches contributes 0. ``recall`` and ``precision`` are the 1-D
    cumulative curves over the ranked detections.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.ndim != 1 or recall.shape != precision.shape:
        raise ValueError(
            f"voc07_ap: recall {recall.shape} and precision {precision.shape} must be equal 1-D"
        )
    reached = recall[None, :] >= _RECALL_LEVELS[:, None]  # (11, D)
    best = np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0)
    return float(best.sum() / len(_RECALL_LEVELS))


def voc_metrics(gt: dict, predictions: list[dict]) -> dict[str, float]:
    """detectron2's PASCAL VOC box metric: {"AP", "AP50", "AP75"} as fractions in [0, 1].

    ``gt`` is a COCO-format dict (annotations may carry ``difficult``); ``predictions`` are COCO
    box results ``{image_id, category_id, bbox [x, y, w, h], score}``. See the module docstring
    for the matching rules and the pixel convention.
    """
    gt_by_class = _ground_truth_by_class(gt)
    det_by_class = _detections_by_class(gt, predictions)
    classes = [c for c, (_, _, difficult) in gt_by_class.items() if (~difficult).any()]
    if not classes:
        raise ValueError("voc_metrics: ground truth has no non-difficult annotations")

    # ap[threshold index, class index]
    ap = np.zeros((len(IOU_THRESHOLDS), len(classes)))
    for k, cat in enumerate(classes):
        gt_images, gt_boxes, difficult = gt_by_class[cat]
        det_images, det_boxes, scores = det_by_class.get(cat, _no_detections())
        order = np.argsort(-scores, kind="stable")
        best_iou, best_gt = _best_overlaps(det_images[order], det_boxes[order], gt_images, gt_boxes)
        for t, threshold in enumerate(IOU_THRESHOLDS):
            ap[t, k] = _class_ap(best_iou, best_gt, difficult, threshold)

    per_threshold = ap.mean(axis=1)
    return {
        "AP": float(per_threshold.mean()),
        "AP50": float(per_threshold[IOU_THRESHOLDS.index(0.5)]),
        "AP75": float(per_threshold[IOU_THRESHOLDS.index(0.75)]),
    }


def _class_ap(
    best_iou: np.ndarray, best_gt: np.ndarray, difficult: np.ndarray, threshold: float
) -> float:
    """AP of one class at one IoU threshold from the ranked detections' best overlaps.

    Vectorised form of the devkit's sequential loop: among the detections whose best ground
    truth is hit (IoU > t) and not difficult, the first one in rank order per ground truth is a
    TP and later ones are duplicates (FP); detections hitting a difficult one are ignored.
    """
    hit = best_iou > threshold
    ignored = hit & difficult[np.maximum(best_gt, 0)]
    claims = np.flatnonzero(hit & ~ignored)  # rank order
    _, first = np.unique(best_gt[claims], return_index=True)
    tp = np.zeros(len(best_iou))
    tp[claims[first]] = 1.0
    fp = (~ignored).astype(np.float64) - tp

    tp, fp = np.cumsum(tp), np.cumsum(fp)
    num_positives = int((~difficult).sum())
    recall = tp / num_positives
    # As the devkit: guard 0/0 where only ignored detections were seen so far.
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc07_ap(recall, precision)


def _best_overlaps(
    det_images: np.ndarray, det_boxes: np.ndarray, gt_images: np.ndarray, gt_boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each detection, the highest IoU with a same-image ground truth and its index.

    Detections in images without ground truth of the class get IoU -inf and index -1. This does
    not depend on the threshold (the devkit's argmax ignores whether a ground truth is matched),
    so it is computed once per class.
    """
    best_iou = np.full(len(det_images), -np.inf)
    best_gt = np.full(len(det_images), -1, dtype=np.int64)
    gt_index = _indices_by_key(gt_images)
    for image, dets in _indices_by_key(det_images).items():
        gts = gt_index.get(image)
        if gts is None:
            continue
        iou = _devkit_iou(det_boxes[dets], gt_boxes[gts])  # (len(dets), len(gts))
        best_iou[dets] = iou.max(axis=1)
        best_gt[dets] = gts[iou.argmax(axis=1)]
    return best_iou, best_gt


def _devkit_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of 1-based inclusive boxes with the devkit's +1 widths and heights.

    Hand-written rather than torchvision.ops.box_iou because that uses continuous widths; the
    formula is the devkit's so that rounding matches it as well.
    """
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(ix2 - ix1 + 1.0, 0.0) * np.maximum(iy2 - iy1 + 1.0, 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _to_devkit_box(bbox: object, label: str) -> list[float]:
    """COCO [x, y, w, h] (0-based continuous) -> devkit [x1, y1, x2, y2] (1-based inclusive)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"voc_metrics: {label} has invalid bbox {bbox!r} (want [x, y, w, h])")
    x, y, w, h = (float(v) for v in bbox)
    return [x + 1.0, y + 1.0, x + w, y + h]


def _ground_truth_by_class(gt: dict) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """category id -> (image ids (G,), devkit boxes (G, 4), difficult flags (G,) bool)."""
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"voc_metrics: ground truth has no {key!r} list")
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    rows: dict[int, list[tuple]] = defaultdict(list)
    for ann in gt["annotations"]:
        label = f"ground-truth annotation id={ann.get('id')!r}"
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"voc_metrics: {label} has unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in category_ids:
            raise ValueError(
                f"voc_metrics: {label} has unknown category_id {ann.get('category_id')!r}"
            )
        difficult = bool(ann.get("difficult", 0)) or bool(ann.get("iscrowd", 0))
        box = _to_devkit_box(ann.get("bbox"), label)
        rows[ann["category_id"]].append((ann["image_id"], box, difficult))
    return {
        cat: (
            np.array([r[0] for r in rs]),
            np.array([r[1] for r in rs], dtype=np.float64).reshape(-1, 4),
            np.array([r[2] for r in rs], dtype=bool),
        )
        for cat, rs in rows.items()
    }


def _detections_by_class(
    gt: dict, predictions: list[dict]
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """category id -> (image ids (D,), devkit boxes (D, 4), scores (D,))."""
    check_predictions(gt, predictions, ("image_id", "category_id", "bbox", "score"), "voc_metrics")
    rows: dict[int, list[tuple]] = defaultdict(list)
    for i, pred in enumerate(predictions):
        box = _to_devkit_box(pred["bbox"], f"prediction #{i}")
        rows[pred["category_id"]].append((pred["image_id"], box, float(pred["score"])))
    return {
        cat: (
            np.array([r[0] for r in rs]),
            np.array([r[1] for r in rs], dtype=np.float64).reshape(-1, 4),
            np.array([r[2] for r in rs], dtype=np.float64),
        )
        for cat, rs in rows.items()
    }


def _no_detections() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty detection arrays for a class nobody predicted (its AP is 0)."""
    return np.zeros(0, dtype=np.int64), np.zeros((0, 4)), np.zeros(0)


def _indices_by_key(keys: np.ndarray) -> dict[object, np.ndarray]:
    """Group positions by value: key -> ascending indices where ``keys == key``."""
    groups: dict[object, list[int]] = defaultdict(list)
    for i, key in enumerate(keys.tolist()):
        groups[key].append(i)
    return {key: np.asarray(idx, dtype=np.int64) for key, idx in groups.items()}
