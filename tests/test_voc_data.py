"""PASCAL VOC as distributed (dupr.data.voc): a tiny VOCdevkit built offline, read as the paper's
protocol (§4.1) reads it: train on VOC2007 + VOC2012 trainval, test on VOC2007 test, 1-based
inclusive XML boxes as 0-based pixel edges, the 20 classes in the standard order, `difficult`
objects trained on and ignored by both metrics; and its checks before anything runs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dupr.config import ConfigError
from dupr.data.coco import CocoDetection, data_summary
from dupr.data.voc import VOC_CLASSES, VocFormatError, load_voc, parse_annotation
from dupr.evaluation.finetune import DetectionConfig, evaluate
from dupr_platform import eval_stages
from dupr_platform.configs import compose, validate_pipeline
from dupr_platform.eval_stages import check_eval_data, detection_set
from helpers import stage_context

ROOT = Path(__file__).resolve().parent.parent

Box = tuple[int, int, int, int]
# (name, 1-based inclusive (xmin, ymin, xmax, ymax), difficult tag: "0", "1" or None for none)
Obj = tuple[str, Box, str | None]

# year -> image id -> (width, height, objects)
DEVKIT: dict[str, dict[str, tuple[int, int, list[Obj]]]] = {
    "VOC2007": {
        # trainval: a box on the whole image (1..W, 1..H) and one inside it
        "000001": (48, 40, [("dog", (1, 1, 48, 40), "0"), ("person", (5, 6, 14, 20), "0")]),
        # trainval: a difficult object, which training keeps
        "000002": (40, 32, [("chair", (2, 3, 10, 12), "1")]),
        # test only: a box at the right border (xmax = W)
        "000003": (48, 40, [("cat", (3, 4, 22, 25), "0"), ("dog", (30, 2, 48, 18), "0")]),
        # test only: a difficult dog, and a box at the right and bottom borders
        "000004": (40, 32, [("dog", (5, 5, 20, 20), "1"), ("tvmonitor", (22, 1, 40, 32), "0")]),
    },
    "VOC2012": {
        "2008_000001": (36, 30, [("horse", (10, 10, 30, 25), None)]),  # no <difficult> tag
        "2008_000002": (36, 30, [("sheep", (1, 1, 10, 10), "0")]),  # in no image set
    },
}
IMAGE_SETS = {
    "VOC2007": {"trainval": ["000001", "000002"], "test": ["000003", "000004"]},
    "VOC2012": {"trainval": ["2008_000001"]},
}


def write_xml(path: Path, width: int, height: int, objects: list[Obj]) -> None:
    """A VOC annotation file as the devkit writes them (the tags the loader reads, and more)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = path.parent.parent.name
    ET.SubElement(root, "filename").text = path.stem + ".jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        if difficult is not None:
            ET.SubElement(obj, "difficult").text = difficult
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.ElementTree(root).write(path)


def build_devkit(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for year, images in DEVKIT.items():
        for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / year / folder).mkdir(parents=True)
        for voc_id, (width, height, objects) in images.items():
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / year / "JPEGImages" / f"{voc_id}.jpg")
            write_xml(root / year / "Annotations" / f"{voc_id}.xml", width, height, objects)
        for image_set, ids in IMAGE_SETS[year].items():
            (root / year / "ImageSets" / "Main" / f"{image_set}.txt").write_text(
                "".join(f"{i}\n" for i in ids)
            )
        # A per-class image set, as the devkit has: not read.
        (root / year / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000001  1\n")
    return root


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    return build_devkit(tmp_path / "VOCdevkit")


def _by_voc_id(coco: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    ids = {im["id"]: im["voc_id"] for im in coco["images"]}
    anns: dict[str, list[dict[str, Any]]] = {v: [] for v in ids.values()}
    for ann in coco["annotations"]:
        anns[ids[ann["image_id"]]].append(ann)
    return anns


# ---------------------------------------------------------------------------------------------
# Splits, classes, boxes


def test_train_is_2007_and_2012_trainval_and_test_is_2007_test(devkit: Path) -> None:
    train, test = load_voc(devkit, "train"), load_voc(devkit, "test")
    assert [im["voc_id"] for im in train["images"]] == ["000001", "000002", "2008_000001"]
    assert [im["file_name"] for im in train["images"]] == [
        "VOC2007/JPEGImages/000001.jpg",
        "VOC2007/JPEGImages/000002.jpg",
        "VOC2012/JPEGImages/2008_000001.jpg",
    ]
    assert [im["voc_id"] for im in test["images"]] == ["000003", "000004"]
    assert [(im["width"], im["height"]) for im in test["images"]] == [(48, 40), (40, 32)]
    # Integer ids, unique within a split (VOC ids are strings).
    assert [im["id"] for im in train["images"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="split must be one of train, test"):
        load_voc(devkit, "val")


def test_classes_are_the_20_in_the_standard_order(devkit: Path) -> None:
    test = load_voc(devkit, "test")
    assert [c["name"] for c in test["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in test["categories"]] == list(range(1, 21))
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    dataset = CocoDetection(devkit, test)
    assert dataset.num_classes == 20
    _, target = dataset[0]  # cat, dog
    assert target["labels"].tolist() == [VOC_CLASSES.index("cat") + 1, 12]
    assert VOC_CLASSES[12 - 1] == "dog"  # a class in the middle of the list


def test_boxes_are_1_based_inclusive_converted_to_0_based_pixel_edges(devkit: Path) -> None:
    train = load_voc(devkit, "train")
    dog, person = _by_voc_id(train)["000001"]
    # (1, 1, 48, 40) on a 48x40 image covers it: [0, 0, 48, 40] exactly.
    assert dog["bbox"] == [0.0, 0.0, 48.0, 40.0] and dog["area"] == 48.0 * 40.0
    # detectron2: (xmin - 1, ymin - 1, xmax, ymax) -> [4, 5, 14, 20], i.e. w = 14 - 5 + 1.
    assert person["bbox"] == [4.0, 5.0, 10.0, 15.0]
    image, target = CocoDetection(devkit, train)[0]
    assert image.shape == (3, 40, 48)
    assert target["boxes"].tolist() == [[0.0, 0.0, 48.0, 40.0], [4.0, 5.0, 14.0, 20.0]]
    # At the right and bottom borders of the test images: xmax = W, ymax = H stay in the image.
    _, border = CocoDetection(devkit, load_voc(devkit, "test"))[1]
    assert border["boxes"].tolist() == [[4.0, 4.0, 20.0, 20.0], [21.0, 0.0, 40.0, 32.0]]


def test_difficult_objects_are_trained_on_flagged_and_counted(devkit: Path) -> None:
    train, test = load_voc(devkit, "train"), load_voc(devkit, "test")
    (chair,) = _by_voc_id(train)["000002"]
    assert chair["difficult"] == 1 and chair["iscrowd"] == 0
    _, target = CocoDetection(devkit, train)[1]  # in the training targets (detectron2)
    assert target["labels"].tolist() == [VOC_CLASSES.index("chair") + 1]
    (horse,) = _by_voc_id(train)["2008_000001"]
    assert horse["difficult"] == 0  # no <difficult> tag: not difficult
    assert data_summary(train) == {"images": 3, "objects": 4, "crowd": 0, "difficult": 1}
    assert data_summary(test) == {"images": 2, "objects": 4, "crowd": 0, "difficult": 1}


# ---------------------------------------------------------------------------------------------
# The metrics ignore difficult objects


class Oracle(nn.Module):
    """A stub detector: returns the given detections (xyxy, label, score) per image, in order."""

    def __init__(self, per_image: list[list[tuple[list[float], int, float]]]) -> None:
        super().__init__()
        self.per_image = per_image
        self.calls = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for _ in images:
            rows = self.per_image[self.calls]
            self.calls += 1
            outputs.append(
                {
                    "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
                    "scores": torch.tensor([r[2] for r in rows], dtype=torch.float32),
                }
            )
        return outputs


def _ap(dataset: CocoDetection, on_difficult: bool) -> tuple[float, float]:
    """(VOC AP, COCO AP) of a detector exact on every non-difficult test box, plus, when
    `on_difficult`, a detection on the difficult dog that outscores everything else."""
    dog, cat, tv = (VOC_CLASSES.index(c) + 1 for c in ("dog", "cat", "tvmonitor"))
    first = [([2.0, 3.0, 22.0, 25.0], cat, 0.9), ([29.0, 1.0, 48.0, 18.0], dog, 0.9)]
    second = [([21.0, 0.0, 40.0, 32.0], tv, 0.9)]
    if on_difficult:
        second.append(([4.0, 4.0, 20.0, 20.0], dog, 0.99))
    metrics = evaluate(Oracle([first, second]), dataset, "cpu", voc=True)
    return metrics["voc/AP"], metrics["bbox/AP"]


def test_difficult_objects_are_neither_positives_nor_true_or_false_positives(devkit) -> None:
    test = CocoDetection(devkit, load_voc(devkit, "test"))
    assert _ap(test, on_difficult=False) == (pytest.approx(1.0), pytest.approx(1.0))
    assert _ap(test, on_difficult=True) == (pytest.approx(1.0), pytest.approx(1.0))

    # Counter-checks. As an ordinary object, the difficult dog would be a positive that the
    # first detector misses (recall 1/2 for dogs).
    ordinary = load_voc(devkit, "test")
    for ann in ordinary["annotations"]:
        ann["difficult"] = 0
    voc_ap, coco_ap = _ap(CocoDetection(devkit, ordinary), on_difficult=False)
    assert voc_ap < 0.9 and coco_ap < 0.9
    # Left out of the ground truth, the detection on it would be a false positive ranked first.
    dropped = load_voc(devkit, "test")
    dropped["annotations"] = [a for a in dropped["annotations"] if not a["difficult"]]
    voc_ap, coco_ap = _ap(CocoDetection(devkit, dropped), on_difficult=True)
    assert voc_ap < 0.9 and coco_ap < 0.9


# ---------------------------------------------------------------------------------------------
# Checks before anything runs: one line naming the file


def _check(root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        check_eval_data({"detection": {"voc_root": str(root)}})
    message = str(info.value)
    assert "\n" not in message and message.startswith("eval.data.detection.voc_root: ")
    return message


def test_a_good_devkit_passes_preflight(devkit: Path) -> None:
    check_eval_data({"detection": {"voc_root": str(devkit)}, "classification": {}})


def test_a_missing_image_set_file_is_named(devkit: Path) -> None:
    listed = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    listed.unlink()
    assert _check(devkit) == (
        f"eval.data.detection.voc_root: {listed}: missing (a VOCdevkit root holds VOC2007/ "
        "and VOC2012/, each with Annotations/, ImageSets/Main/ and JPEGImages/)"
    )


def test_an_id_without_its_xml_or_jpeg_is_named(devkit: Path) -> None:
    xml = devkit / "VOC2012" / "Annotations" / "2008_000001.xml"
    xml.unlink()
    message = _check(devkit)
    assert f"{xml}: missing (1 of the 1 ids in " in message
    assert "VOC2012/ImageSets/Main/trainval.txt have no Annotations/<id>.xml)" in message
    write_xml(xml, *DEVKIT["VOC2012"]["2008_000001"])
    jpeg = devkit / "VOC2007" / "JPEGImages" / "000004.jpg"
    jpeg.unlink()
    assert f"{jpeg}: missing (1 of the 2 ids in" in _check(devkit)


def test_malformed_xml_is_named_with_its_position(devkit: Path) -> None:
    xml = devkit / "VOC2007" / "Annotations" / "000003.xml"
    xml.write_text("<annotation><size><width>48</width></size>\n<object></annotation>")
    message = _check(devkit)
    assert f"{xml}: not valid XML (mismatched tag: line 2, column" in message


def test_a_missing_root_or_year_folder_is_named(devkit: Path) -> None:
    assert "'/no/such/VOCdevkit' does not exist" in _check(Path("/no/such/VOCdevkit"))
    (devkit / "VOC2012").rename(devkit / "VOC2012-renamed")
    assert f"{devkit / 'VOC2012'}: missing (a VOCdevkit root holds" in _check(devkit)


@pytest.mark.parametrize(
    "objects, text, expected",
    [
        ([("zebra", (1, 1, 5, 5), "0")], None, "object[0].name: 'zebra' is not a VOC class"),
        ([("dog", (9, 1, 5, 5), "0")], None, "object[0].bndbox: expected xmin <= xmax"),
        ([("dog", (1, 1, 5, 5), "2")], None, "object[0].difficult: expected 0 or 1, got '2'"),
        ([], "<annotation><size><width>9</width></size></annotation>", "size.height: missing"),
        ([], "<annotation><size><width>9</width><height>-1</height></size></annotation>", "got"),
        ([], "<voc/>", "expected an <annotation> root element, got <voc>"),
    ],
)
def test_bad_annotations_name_the_file_and_the_field(tmp_path, objects, text, expected) -> None:
    path = tmp_path / "000001.xml"
    if text is None:
        write_xml(path, 10, 10, objects)
    else:
        path.write_text(text)
    with pytest.raises(VocFormatError) as info:
        parse_annotation(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_config_refuses_voc_with_coco_fields_object_storage_and_masks(tmp_path: Path) -> None:
    def refused(*overrides: str) -> str:
        where = [f"storage={tmp_path / 's'}", f"tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
        values = compose(ROOT / "configs", "pretrain_and_eval", [*where, *overrides])
        with pytest.raises(ConfigError) as info:
            validate_pipeline(values)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused(
        "eval.data.detection.voc_root=/data/VOCdevkit", "eval.data.detection.train_images=/x"
    ) == (
        "eval.data.detection: voc_root and train_images exclude each other (give a VOCdevkit "
        "root or the four COCO fields train_images, train_annotations, val_images, "
        "val_annotations, not both)"
    )
    assert refused("eval.data.detection.voc_root=s3://b/VOCdevkit").startswith(
        "eval.data.detection.voc_root='s3://b/VOCdevkit': must be a local or shared-filesystem"
    )
    assert "mask_rcnn_fpn needs instance masks" in refused(
        "eval.data.detection.voc_root=/data/VOCdevkit", "eval.detection.detectors=[mask_rcnn_fpn]"
    )


# ---------------------------------------------------------------------------------------------
# The stages read it


def test_every_stage_reads_the_same_voc_splits(devkit: Path) -> None:
    inputs = {"backbone": None, "voc_root": str(devkit), "train_images": None}
    train, val = detection_set(inputs, "train"), detection_set(inputs, "val")
    assert [im["voc_id"] for im in val.coco["images"]] == ["000003", "000004"]
    assert len(train) == 3 and val.image_path(0) == devkit / "VOC2007/JPEGImages/000003.jpg"
    assert "VOC2007 test" in val.source


class _NoTracking:
    """RunLogger's interface, recording nothing (no MLflow in this test)."""

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> _NoTracking:
        return cls()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def commit(self) -> None:
        pass

    def flush(self) -> None:
        pass


def test_the_detection_stage_fine_tunes_and_evaluates_on_voc(devkit, tmp_path, monkeypatch):
    """The stage body end to end on the tiny devkit: a few CPU iterations of Faster R-CNN C4,
    then COCO and VOC box AP on VOC2007 test, and the data it used, difficult objects counted."""
    monkeypatch.setattr(eval_stages, "RunLogger", _NoTracking)
    recipe = DetectionConfig.cpu_friendly("faster_rcnn_c4", iterations=2)
    config = {
        "init": "random",
        "arch": "resnet18",
        "detector": "faster_rcnn_c4",
        "voc_metric": True,
        "log_every": 1,
        "checkpoint_minutes": 10.0,
        **{k: v for k, v in vars(recipe).items() if k != "detector"},
        "min_size": 64,
        "max_size": 64,
        "warmup_iters": 1,
    }
    ctx = stage_context(
        tmp_path,
        "detection/faster_rcnn_c4/random",
        config,
        {"backbone": None, "voc_root": str(devkit)},
    )
    out = tmp_path / "out"
    out.mkdir()
    result = eval_stages.detection(ctx, out)
    assert set(result.metrics) == set(eval_stages.metric_names("detection", config))
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("bbox/AP", "voc/AP", "voc/AP50"))
    summary = json.loads((out / "data.json").read_text())
    assert summary["train"] == {"images": 3, "objects": 4, "crowd": 0, "difficult": 1}
    assert summary["val"] == {"images": 2, "objects": 4, "crowd": 0, "difficult": 1}
    assert result.files["data"] == "data.json" and "data.json" in result.artifacts
