"""COCO and PASCAL VOC detection metrics against answers worked out by hand."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from faster_coco_eval import COCO
from faster_coco_eval.core import mask as mask_utils

from dupr.evaluation.coco_metrics import coco_metrics, masks_to_rle
from dupr.evaluation.voc_metrics import voc07_ap, voc_metrics

# One box per COCO size range (area < 32², < 96², larger), over two images and two classes.
BOXES = [
    # (image_id, category_id, [x, y, w, h])
    (1, 1, [10.0, 10.0, 20.0, 20.0]),  # small: 400 px²
    (1, 2, [50.0, 40.0, 60.0, 50.0]),  # medium: 3000 px²
    (2, 1, [20.0, 30.0, 150.0, 120.0]),  # large: 18000 px²
    (2, 2, [5.0, 5.0, 25.0, 30.0]),  # small: 750 px²
]


def _gt(segm: str | None = None) -> dict:
    """COCO ground truth from BOXES; ``segm`` adds "polygon" or "rle" masks filling each box."""
    anns = []
    for i, (image_id, cat, (x, y, w, h)) in enumerate(BOXES, start=1):
        ann = {
            "id": i,
            "image_id": image_id,
            "category_id": cat,
            "bbox": [x, y, w, h],
            "area": w * h,
            "iscrowd": 0,
        }
        if segm == "polygon":
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        elif segm == "rle":
            mask = np.zeros((1, 240, 320), dtype=bool)
            mask[0, int(y) : int(y + h), int(x) : int(x + w)] = True
            ann["segmentation"] = masks_to_rle(mask)[0]
        anns.append(ann)
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 320, "height": 240},
            {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _gt_as_predictions(gt: dict, shift: float = 0.0) -> list[dict]:
    """Every ground-truth box as a detection of score 1, moved right by ``shift`` × its width."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], *a["bbox"][1:]],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]


# ---------------------------------------------------------------------------------------------
# COCO


def test_coco_bbox_perfect_predictions_score_one(capsys):
    gt = _gt()
    predictions = _gt_as_predictions(gt)
    before = copy.deepcopy((gt, predictions))
    metrics = coco_metrics(gt, predictions)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in metrics.items():
        assert value == pytest.approx(1.0), name
    assert capsys.readouterr().out == ""  # the summary is not printed unless asked
    assert (gt, predictions) == before  # inputs are not modified


def test_coco_verbose_prints_summary(capsys):
    coco_metrics(_gt(), _gt_as_predictions(_gt()), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


@pytest.mark.parametrize("segm", ["polygon", "rle"])
def test_coco_segm_perfect_masks_score_one(segm):
    gt = _gt(segm)
    # Rasterise the ground truth through the COCO API, then encode it as results.
    coco = COCO(copy.deepcopy(gt))
    masks = np.stack([coco.annToMask(a) for a in coco.dataset["annotations"]])
    rles = masks_to_rle(masks)
    json.dumps(rles)  # results must be JSON-serialisable
    predictions = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": rle,
            "score": 1.0,
        }
        for a, rle in zip(gt["annotations"], rles, strict=True)
    ]
    metrics = coco_metrics(gt, predictions, iou_type="segm")
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)


def test_coco_segm_wrong_masks_score_zero():
    gt = _gt("rle")
    wrong = np.zeros((len(BOXES), 240, 320), dtype=bool)
    wrong[:, 200:230, 280:310] = True  # far from every object
    predictions = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": r, "score": 1}
        for a, r in zip(gt["annotations"], masks_to_rle(wrong), strict=True)
    ]
    assert coco_metrics(gt, predictions, iou_type="segm")["AP"] == 0.0


def test_masks_to_rle_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = masks_to_rle(masks)
    assert [r["size"] for r in rles] == [[17, 23]] * 3
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(mask_utils.decode(rles).transpose(2, 0, 1), masks)
    assert masks_to_rle(np.zeros((0, 4, 4), dtype=bool)) == []
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        masks_to_rle(np.zeros((4, 4), dtype=bool))


def test_coco_empty_predictions_give_zero():
    metrics = coco_metrics(_gt(), [])
    assert metrics == {name: 0.0 for name in metrics}


def test_coco_shifted_boxes():
    # Moving a box right by 24% of its width: IoU = 0.76 / 1.24 = 0.613. COCO matches IoU >= t,
    # so t = 0.50, 0.55, 0.60 match (AP 1) and 0.65..0.95 do not (AP 0): AP = 3/10.
    gt = _gt()
    metrics = coco_metrics(gt, _gt_as_predictions(gt, shift=0.24))
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == 0.0
    assert metrics["AP"] == pytest.approx(0.3)


def test_coco_size_range_without_objects_is_nan():
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 32**2]  # small ones only
    metrics = coco_metrics(gt, _gt_as_predictions(gt))
    assert metrics["APs"] == pytest.approx(1.0)
    assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])


def test_coco_annotation_id_zero_is_handled():
    # COCOeval treats id 0 as "unmatched"; ids are renumbered internally so AP stays right.
    gt = _gt()
    for i, ann in enumerate(gt["annotations"]):
        ann["id"] = i
    assert coco_metrics(gt, _gt_as_predictions(gt))["AP"] == pytest.approx(1.0)


def test_coco_ignores_voc_difficult_objects():
    """A `difficult` object (PASCAL VOC) is an ignore region, as the VOC protocol prescribes:
    not a positive, and a detection on it is neither a TP nor a FP."""
    gt = _gt()
    gt["annotations"].append(
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [100.0, 100.0, 30.0, 30.0]}
    )
    gt["annotations"][-1]["difficult"] = 1
    exact = _gt_as_predictions({**gt, "annotations": gt["annotations"][:-1]})
    on_difficult = [{"image_id": 1, "category_id": 1, "bbox": [100, 100, 30, 30], "score": 2.0}]
    assert coco_metrics(gt, exact)["AP"] == pytest.approx(1.0)  # missing it costs nothing
    assert coco_metrics(gt, exact + on_difficult)["AP"] == pytest.approx(1.0)  # nor finding it
    assert "iscrowd" not in gt["annotations"][-1]  # the caller's dict is left as it was
    # Counter-checks: as an ordinary object it is a positive; dropped, the detection is a FP.
    gt["annotations"][-1]["difficult"] = 0
    assert coco_metrics(gt, exact)["AP"] < 0.9
    gt["annotations"].pop()
    assert coco_metrics(gt, exact + on_difficult)["AP"] < 0.9


def test_coco_bad_input_names_the_value():
    gt = _gt()
    bad = _gt_as_predictions(gt)
    bad[1]["image_id"] = 99
    with pytest.raises(ValueError, match="prediction #1 has unknown image_id 99"):
        coco_metrics(gt, bad)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        coco_metrics(gt, [], iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        coco_metrics(gt, [], iou_type="keypoints")


# ---------------------------------------------------------------------------------------------
# VOC


def test_voc07_ap_hand_computed():
    # recall    0.2  0.4  0.4   0.8
    # precision 1.0  1.0  0.5   0.8
    # max precision at recall >= r, for r = 0, 0.1, ..., 1:
    #   r = 0.0 .. 0.4 -> 1.0 (5 levels); r = 0.5 .. 0.8 -> 0.8 (4 levels); r = 0.9, 1.0 -> 0.
    # AP = (5 * 1.0 + 4 * 0.8) / 11 = 8.2 / 11
    recall = np.array([0.2, 0.4, 0.4, 0.8])
    precision = np.array([1.0, 1.0, 0.5, 0.8])
    assert voc07_ap(recall, precision) == pytest.approx(8.2 / 11)
    assert voc07_ap(np.array([1.0]), np.array([1.0])) == pytest.approx(1.0)
    assert voc07_ap(np.array([]), np.array([])) == 0.0
    # The devkit's levels come from np.arange(0, 1.1, 0.1), so its "0.3" is 0.30000000000000004
    # and a recall of exactly 0.3 reaches only r = 0, 0.1, 0.2: 3/11, as detectron2 computes.
    assert voc07_ap(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11)
    with pytest.raises(ValueError, match="recall"):
        voc07_ap(np.zeros(3), np.zeros(2))


def _voc_gt(boxes: list[tuple[int, list[float], int]]) -> dict:
    """One-class VOC ground truth from (image_id, [x, y, w, h], difficult)."""
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)],
        "annotations": [
            {"id": k, "image_id": img, "category_id": 1, "bbox": box, "difficult": diff}
            for k, (img, box, diff) in enumerate(boxes, start=1)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def _dets(rows: list[tuple[int, list[float], float]]) -> list[dict]:
    return [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in rows]


def test_voc_metrics_hand_computed():
    # Ground truth: image 1: A [0,0,10,10], B [20,0,10,10]; image 2: C [0,0,10,10] and a
    # difficult D [50,50,10,10]. Positives: 3 (D does not count).
    gt = _voc_gt(
        [
            (1, [0, 0, 10, 10], 0),
            (1, [20, 0, 10, 10], 0),
            (2, [0, 0, 10, 10], 0),
            (2, [50, 50, 10, 10], 1),
        ]
    )
    # Detections by score, with their best IoU:
    #   d1 0.9 img1 on A, IoU 1                    -> TP (A)
    #   d2 0.8 img1 A moved by 1, IoU 90/110=0.82  -> A already taken: duplicate, FP
    #   d3 0.7 img2 on difficult D, IoU 1          -> ignored (neither TP nor FP)
    #   d4 0.6 img2 C moved down 5, IoU 50/150=1/3 -> FP
    #   d5 0.5 img1 B moved by 1, IoU 90/110=0.82  -> TP (B) for t <= 0.80, FP for t >= 0.85
    predictions = _dets(
        [
            (1, [0, 0, 10, 10], 0.9),
            (1, [1, 0, 10, 10], 0.8),
            (2, [50, 50, 10, 10], 0.7),
            (2, [0, 5, 10, 10], 0.6),
            (1, [21, 0, 10, 10], 0.5),
        ]
    )
    # t <= 0.80 (7 thresholds), counting d1, d2, d4, d5 (d3 ignored):
    #   cum TP 1 1 1 2, cum FP 0 1 2 2 -> recall 1/3 1/3 1/3 2/3, precision 1 1/2 1/3 1/2
    #   levels r = 0..0.3 -> 1 (4 levels); r = 0.4..0.6 -> 1/2 (3 levels, 2/3 >= 0.6000..01);
    #   r = 0.7..1 -> 0.  AP = (4 + 1.5) / 11 = 0.5
    # t >= 0.85 (3 thresholds): only d1 is a TP -> recall 1/3 throughout, precision 1 first:
    #   AP = 4 / 11
    # AP = (7 * 0.5 + 3 * 4/11) / 10 = 50.5 / 110
    metrics = voc_metrics(gt, predictions)
    assert metrics["AP50"] == pytest.approx(0.5)
    assert metrics["AP75"] == pytest.approx(0.5)
    assert metrics["AP"] == pytest.approx(50.5 / 110)

    # Counter-checks that the rules above are what produced 0.5:
    # if D were an ordinary ground truth, d3 would be a TP and there would be 4 positives.
    not_difficult = copy.deepcopy(gt)
    not_difficult["annotations"][3]["difficult"] = 0
    assert voc_metrics(not_difficult, predictions)["AP50"] != pytest.approx(0.5)
    # iscrowd counts as difficult.
    crowd = copy.deepcopy(gt)
    crowd["annotations"][3].pop("difficult")
    crowd["annotations"][3]["iscrowd"] = 1
    assert voc_metrics(crowd, predictions) == metrics


def test_voc_duplicate_is_fp_even_with_another_free_ground_truth():
    # E [0,0,10,10] and F [4,0,10,10] in one image. g1 on E -> TP. g2 [1,0,10,10] overlaps E by
    # 90/110 = 0.82 and F by 70/130 = 0.54: the devkit takes E (highest IoU), already matched,
    # so g2 is a FP although F is free. recall 1/2 1/2, precision 1 1/2 -> levels r = 0..0.5
    # -> 1 (6 levels): AP50 = 6/11. (Matching g2 to F instead would give 1.0.)
    gt = _voc_gt([(1, [0, 0, 10, 10], 0), (1, [4, 0, 10, 10], 0)])
    predictions = _dets([(1, [0, 0, 10, 10], 0.9), (1, [1, 0, 10, 10], 0.8)])
    assert voc_metrics(gt, predictions)["AP50"] == pytest.approx(6 / 11)


def test_voc_iou_pixel_convention_and_strict_threshold():
    # A 10x10 box inside a 10x20 one: continuous IoU exactly 100/200 = 0.5, which is not > 0.5,
    # so the detection is a FP and AP50 = 0. (Adding +1 to widths of boxes NOT shifted to
    # 1-based would give 121/231 = 0.52 and a TP.)
    gt = _voc_gt([(1, [0, 0, 10, 10], 0)])
    assert voc_metrics(gt, _dets([(1, [0, 0, 10, 20], 1.0)]))["AP50"] == 0.0
    # A 10x10 box in a 10x19 one: IoU 100/190 = 0.526 > 0.5 -> TP.
    assert voc_metrics(gt, _dets([(1, [0, 0, 10, 19], 1.0)]))["AP50"] == pytest.approx(1.0)


def test_voc_perfect_and_shifted_predictions():
    gt = _gt()
    perfect = voc_metrics(gt, _gt_as_predictions(gt))
    assert perfect == {"AP": pytest.approx(1.0), "AP50": 1.0, "AP75": 1.0}
    # IoU 0.613 passes t = 0.50, 0.55, 0.60 only (as COCO here): AP = 3/10.
    shifted = voc_metrics(gt, _gt_as_predictions(gt, shift=0.24))
    assert shifted == {"AP": pytest.approx(0.3), "AP50": 1.0, "AP75": 0.0}
    assert voc_metrics(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_voc_skips_classes_without_positives():
    # Class 2 has only a difficult object: skipped, so the mean is over class 1 alone.
    gt = _gt()
    gt["annotations"] = [dict(a, difficult=int(a["category_id"] == 2)) for a in gt["annotations"]]
    predictions = [p for p in _gt_as_predictions(gt) if p["category_id"] == 1]
    assert voc_metrics(gt, predictions)["AP"] == pytest.approx(1.0)


def test_voc_bad_input_names_the_value():
    gt = _gt()
    bad = _gt_as_predictions(gt)
    bad[2]["category_id"] = 7
    with pytest.raises(ValueError, match="prediction #2 has unknown category_id 7"):
        voc_metrics(gt, bad)
    bad = _gt_as_predictions(gt)
    bad[0]["bbox"] = [0, 0, -1, 5]
    with pytest.raises(ValueError, match="prediction #0 has invalid bbox"):
        voc_metrics(gt, bad)


def _devkit_loop_ap50(gt: dict, predictions: list[dict]) -> float:
    """The devkit's voc_eval loop, written sequentially, for one class at t = 0.5."""
    anns = gt["annotations"]
    boxes = {a["id"]: np.array(a["bbox"], dtype=float) for a in anns}
    npos = sum(1 for a in anns if not a.get("difficult", 0))
    taken: set[int] = set()
    tp, fp = [], []
    for p in sorted(predictions, key=lambda p: -p["score"]):
        px, py, pw, ph = p["bbox"]
        best, best_ann = -np.inf, None
        for a in anns:
            if a["image_id"] != p["image_id"]:
                continue
            gx, gy, gw, gh = boxes[a["id"]]
            iw = max(min(px + pw, gx + gw) - max(px, gx), 0.0)
            ih = max(min(py + ph, gy + gh) - max(py, gy), 0.0)
            iou = iw * ih / (pw * ph + gw * gh - iw * ih)
            if iou > best:
                best, best_ann = iou, a
        if best > 0.5 and best_ann.get("difficult", 0):
            tp.append(0), fp.append(0)
        elif best > 0.5 and best_ann["id"] not in taken:
            taken.add(best_ann["id"])
            tp.append(1), fp.append(0)
        else:
            tp.append(0), fp.append(1)
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    return voc07_ap(ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(float).eps))


def test_voc_matches_sequential_devkit_loop_on_random_boxes():
    # Detections are jittered copies of the ground truth (some twice, i.e. duplicates) plus
    # random boxes, so TPs, duplicates, misses and difficult hits all occur.
    rng = np.random.default_rng(3)
    values = []
    for _ in range(30):
        rows = [
            (int(rng.integers(1, 3)), [*rng.uniform(0, 40, 2), *rng.uniform(5, 30, 2)], int(d))
            for d in rng.random(int(rng.integers(1, 8))) < 0.2
        ]
        if all(r[2] for r in rows):
            continue
        dets = []
        for image_id, (x, y, w, h), _ in rows:
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
                dets.append((image_id, [x + jitter[0], y + jitter[1], w + jitter[2], h]))
        for _ in range(int(rng.integers(0, 4))):
            dets.append((int(rng.integers(1, 3)), [*rng.uniform(0, 40, 2), *rng.uniform(5, 30, 2)]))
        scores = rng.permutation(len(dets)).tolist()
        predictions = _dets([(i, b, s) for (i, b), s in zip(dets, scores, strict=True)])
        gt = _voc_gt(rows)
        expected = _devkit_loop_ap50(gt, predictions)
        values.append(expected)
        assert voc_metrics(gt, predictions)["AP50"] == pytest.approx(expected)
    assert len(set(np.round(values, 6))) > 5  # the cases are varied, not all 0 or 1
