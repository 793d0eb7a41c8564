"""COCO box and mask AP (the metric of the paper's COCO tables, §4.2) via faster-coco-eval.

faster-coco-eval mirrors pycocotools' COCO/COCOeval and gives identical AP numbers, about ten
times faster at COCO-val scale (its matching and accumulation run in C++), so it is used instead
of torchvision's reference scripts (which wrap pycocotools).

Inputs are plain COCO-format dicts: ``gt`` with ``images``, ``annotations`` and ``categories``;
``predictions`` a list of result dicts ``{image_id, category_id, bbox [x, y, w, h], score}`` and,
for masks, ``segmentation`` as an RLE dict (see `masks_to_rle`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Iterator

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils

IOU_TYPES = ("bbox", "segm")

# Positions of the six AP numbers in COCOeval.stats (the standard summarize() layout).
COCO_STAT_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5}


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """Encode binary masks (N, H, W) as COCO RLE dicts for ``segm`` results.

    ``counts`` is decoded to ``str`` so the results can be written as JSON (pycocotools returns
    bytes); faster-coco-eval accepts both forms when evaluating.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks_to_rle: masks must have shape (N, H, W), got {masks.shape}")
    if masks.shape[0] == 0:
        return []
    # The C encoder wants an (H, W, N) uint8 array in Fortran (column-major) order.
    stacked = np.asfortranarray((masks != 0).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(stacked)
    for rle in rles:
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_metrics(
    gt: dict, predictions: list[dict], iou_type: str = "bbox", verbose: bool = False
) -> dict[str, float]:
    """COCO AP, AP50, AP75, APs, APm, APl as fractions in [0, 1] (COCOeval, 100 dets/image).

    A size range without ground truth has no AP; COCOeval reports -1 there, returned as NaN (as
    detectron2's COCOEvaluator does). Neither ``gt`` nor ``predictions`` is modified. The summary
    table is only printed when ``verbose``.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"coco_metrics: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt = _checked_gt(gt, iou_type)
    results = _checked_predictions(gt, predictions, iou_type)

    with _quiet(verbose):
        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_printer(verbose))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    return {
        name: float(stats[i]) if stats[i] >= 0 else math.nan for name, i in COCO_STAT_INDEX.items()
    }


def _checked_gt(gt: dict, iou_type: str) -> dict:
    """A validated deep copy of ``gt`` (COCOeval writes into annotations) with ids renumbered.

    Annotation ids are renumbered 1..N because COCOeval uses them as match markers where 0 means
    "unmatched" (an id 0, common in converted VOC sets, would silently skew AP); missing
    ``iscrowd`` defaults to 0 and missing ``area`` to the box area. A PASCAL VOC ``difficult``
    object becomes a crowd region, COCOeval's only ignore flag: the VOC protocol counts it
    neither as a positive nor, when a detection matches it, as a TP or a FP (COCOeval matches
    a detection to an ignored region only when no other ground truth takes it, and measures
    that overlap as intersection over the detection's area).
    """
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"coco_metrics: ground truth has no {key!r} list")
    if not gt["annotations"]:
        raise ValueError("coco_metrics: ground truth has no annotations, AP is undefined")
    gt = copy.deepcopy(gt)
    image_ids = {img["id"] for img in gt["images"]}
    for new_id, ann in enumerate(gt["annotations"], start=1):
        label = f"ground-truth annotation id={ann.get('id')!r}"
        if ann.get("image_id") not in image_ids:
            raise ValueError(f"coco_metrics: {label} has unknown image_id {ann.get('image_id')!r}")
        _check_box(ann.get("bbox"), label)
        if iou_type == "segm" and "segmentation" not in ann:
            raise ValueError(f"coco_metrics: {label} has no 'segmentation' for iou_type 'segm'")
        ann["id"] = new_id
        ann.setdefault("iscrowd", 0)
        if ann.get("difficult"):
            ann["iscrowd"] = 1
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return gt


def check_predictions(
    gt: dict, predictions: list[dict], required: tuple[str, ...], caller: str
) -> None:
    """Every prediction has the `required` keys and refers to an image and a category of `gt`;
    else a one-line ValueError naming the prediction (shared by the COCO and VOC metrics)."""
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    for i, pred in enumerate(predictions):
        label = f"prediction #{i}"
        for key in required:
            if key not in pred:
                raise ValueError(f"{caller}: {label} has no {key!r}")
        if pred["image_id"] not in image_ids:
            raise ValueError(f"{caller}: {label} has unknown image_id {pred['image_id']!r}")
        if pred["category_id"] not in category_ids:
            raise ValueError(f"{caller}: {label} has unknown category_id {pred['category_id']!r}")


def _checked_predictions(gt: dict, predictions: list[dict], iou_type: str) -> list[dict]:
    """A validated deep copy of ``predictions`` (loadRes adds fields to each dict).

    For ``segm`` the boxes are dropped, as detectron2 does: with a ``bbox`` present COCO's
    loadRes takes the box area as the instance area, which changes the small/medium/large split.
    """
    required = (
        "image_id",
        "category_id",
        "score",
        "bbox" if iou_type == "bbox" else "segmentation",
    )
    check_predictions(gt, predictions, required, "coco_metrics")
    results = []
    for i, pred in enumerate(predictions):
        result = copy.deepcopy(pred)
        if iou_type == "bbox":
            _check_box(result["bbox"], f"prediction #{i}")
            result.pop("segmentation", None)
        else:
            result.pop("bbox", None)
        results.append(result)
    return results


def _check_box(box: object, label: str) -> None:
    """A COCO box is [x, y, w, h] with non-negative width and height."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or box[2] < 0 or box[3] < 0:
        raise ValueError(f"coco_metrics: {label} has invalid bbox {box!r} (want [x, y, w, h])")


def _printer(verbose: bool):
    """Where COCOeval's summary lines go: stdout when asked, otherwise nowhere."""
    return print if verbose else logging.getLogger(__name__).debug


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallow stray stdout from the evaluation library unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
