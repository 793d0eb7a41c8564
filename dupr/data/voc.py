"""PASCAL VOC detection data read from a VOCdevkit as distributed, as a COCO-format dict.

The paper fine-tunes Faster R-CNN R50-C4 on VOC2007 trainval + VOC2012 trainval and evaluates it
on VOC2007 test (§4.1, MoCo's protocol; detectron2's `voc_2007_trainval`, `voc_2012_trainval`
and `voc_2007_test`). `load_voc` reads those splits straight from the devkit
(`ImageSets/Main/<set>.txt`, `Annotations/<id>.xml`, `JPEGImages/<id>.jpg`) into the in-memory
COCO-format dict that `dupr.data.coco.CocoDetection` takes, with the devkit root as its image
root: no conversion step, no second copy of the annotations on disk.

Conventions, those of detectron2's `pascal_voc` loader and of the VOC devkit:

- the 20 classes in the standard order (`VOC_CLASSES`) are category ids 1..20, so the
  detector's labels 1..20 follow that order;
- XML boxes are 1-based inclusive pixel indices: `(xmin, ymin, xmax, ymax)` becomes the 0-based
  pixel-edge box `(xmin - 1, ymin - 1, xmax, ymax)`, the COCO bbox
  `[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`; `(1, 1, W, H)` covers the image;
- `difficult` objects stay in the annotations with `difficult: 1` and `iscrowd: 0`. Training
  uses them, as detectron2 does (its loader keeps them: "they don't hurt accuracy"); both
  metrics ignore them, as the VOC protocol prescribes (`dupr.evaluation.voc_metrics`: a
  detection matched to one is neither a TP nor a FP and they are not positives;
  `dupr.evaluation.coco_metrics` makes them COCOeval ignore regions). An object without a
  `difficult` tag (a few VOC2012 files) is not difficult.

Every problem is one `VocFormatError` line that names the file: a missing folder or image-set
file, a listed id without its XML or JPEG, XML that does not parse, an unknown class, a bad box.
XML is parsed with the standard library's ElementTree (expat guards against entity expansion).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dupr.data.coco import _short

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# The paper's splits (§4.1): (year folder, image set of ImageSets/Main) pairs.
VOC_SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("VOC2007", "trainval"), ("VOC2012", "trainval")),
    "test": (("VOC2007", "test"),),
}

LAYOUT = (
    "a VOCdevkit root holds VOC2007/ and VOC2012/, each with Annotations/, ImageSets/Main/ "
    "and JPEGImages/"
)


class VocFormatError(ValueError):
    """A VOCdevkit that cannot be read as the VOC protocol needs; one line naming the file."""


@dataclass(frozen=True)
class VocObject:
    """One `<object>`: class name, 1-based inclusive (xmin, ymin, xmax, ymax), difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VocAnnotation:
    """One `Annotations/<id>.xml`: the image size it states and its objects."""

    width: int
    height: int
    objects: tuple[VocObject, ...]


def read_image_set(year_root: str | os.PathLike[str], image_set: str) -> list[str]:
    """The image ids of `ImageSets/Main/<image_set>.txt`, one per line, in file order."""
    path = Path(year_root) / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise VocFormatError(f"{path}: missing ({LAYOUT})")
    ids: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1 or "/" in fields[0]:
            raise VocFormatError(
                f"{path}: line {number}: expected one image id, got {_short(line)}"
            )
        if fields[0] in seen:
            raise VocFormatError(f"{path}: line {number}: duplicate image id {fields[0]!r}")
        seen.add(fields[0])
        ids.append(fields[0])
    if not ids:
        raise VocFormatError(f"{path}: no image ids")
    return ids


def parse_annotation(path: str | os.PathLike[str]) -> VocAnnotation:
    """One VOC XML file, checked: its size, and each object's class, box and difficult flag."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise VocFormatError(f"{path}: not valid XML ({exc})") from None
    if root.tag != "annotation":
        raise VocFormatError(f"{path}: expected an <annotation> root element, got <{root.tag}>")
    width = _int(path, root, "size/width")
    height = _int(path, root, "size/height")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        where = f"object[{i}]"
        name = _text(path, obj, "name", where)
        if name not in VOC_CLASSES:
            raise VocFormatError(
                f"{path}: {where}.name: {name!r} is not a VOC class (valid: "
                f"{', '.join(VOC_CLASSES)})"
            )
        difficult = obj.find("difficult")
        flag = (difficult.text or "").strip() if difficult is not None else "0"
        if flag not in ("0", "1"):
            raise VocFormatError(f"{path}: {where}.difficult: expected 0 or 1, got {flag!r}")
        box = tuple(
            _number(path, obj, f"bndbox/{k}", where) for k in ("xmin", "ymin", "xmax", "ymax")
        )
        xmin, ymin, xmax, ymax = box
        if xmax < xmin or ymax < ymin:
            raise VocFormatError(
                f"{path}: {where}.bndbox: expected xmin <= xmax and ymin <= ymax (1-based, "
                f"inclusive), got {xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}"
            )
        objects.append(VocObject(name, (xmin, ymin, xmax, ymax), flag == "1"))
    return VocAnnotation(width, height, tuple(objects))


def voc_bbox(box: tuple[float, float, float, float]) -> list[float]:
    """A 1-based inclusive VOC box as a COCO `[x, y, w, h]` with 0-based pixel-edge corners
    (detectron2's `[xmin - 1, ymin - 1, xmax, ymax]`)."""
    xmin, ymin, xmax, ymax = box
    return [xmin - 1.0, ymin - 1.0, xmax - xmin + 1.0, ymax - ymin + 1.0]


def load_voc(root: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """The COCO-format dict of `split` of a VOCdevkit (`VOC_SPLITS`: "train" is VOC2007 +
    VOC2012 trainval, "test" is VOC2007 test), for `CocoDetection(root, load_voc(root, split))`.

    Images are numbered 1..N in image-set order (VOC ids are strings; each image keeps its id as
    `voc_id`) and their `file_name` is relative to `root` (`VOC2007/JPEGImages/000005.jpg`).
    Every listed id is checked to have its XML and JPEG before any XML is parsed.
    """
    if split not in VOC_SPLITS:
        raise ValueError(f"load_voc: split must be one of {', '.join(VOC_SPLITS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise VocFormatError(f"{root}: not a folder ({LAYOUT})")
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for year, image_set in VOC_SPLITS[split]:
        year_root = root / year
        if not year_root.is_dir():
            raise VocFormatError(f"{year_root}: missing ({LAYOUT})")
        ids = read_image_set(year_root, image_set)
        listed = year_root / "ImageSets" / "Main" / f"{image_set}.txt"
        for folder, suffix in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
            present = _file_names(year_root / folder)
            missing = [i for i in ids if i + suffix not in present]
            if missing:
                raise VocFormatError(
                    f"{year_root / folder / (missing[0] + suffix)}: missing ({len(missing)} of "
                    f"the {len(ids)} ids in {listed} have no {folder}/<id>{suffix})"
                )
        for voc_id in ids:
            record = parse_annotation(year_root / "Annotations" / f"{voc_id}.xml")
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{year}/JPEGImages/{voc_id}.jpg",
                    "width": record.width,
                    "height": record.height,
                    "voc_id": voc_id,
                }
            )
            for obj in record.objects:
                bbox = voc_bbox(obj.box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": VOC_CLASSES.index(obj.name) + 1,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": 0,
                        "difficult": int(obj.difficult),
                    }
                )
    sets = " + ".join(f"{year} {image_set}" for year, image_set in VOC_SPLITS[split])
    return {
        "info": {"description": f"PASCAL VOC {sets} from {root}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(VOC_CLASSES, 1)],
    }


def _file_names(folder: Path) -> set[str]:
    """The names of the files in `folder`: one listing instead of a stat per image."""
    if not folder.is_dir():
        raise VocFormatError(f"{folder}: missing ({LAYOUT})")
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if entry.is_file()}


def _text(path: Path, element: ET.Element, tag: str, where: str = "annotation") -> str:
    found = element.find(tag)
    text = (found.text or "").strip() if found is not None else ""
    if not text:
        raise VocFormatError(f"{path}: {where}.{tag.replace('/', '.')}: missing")
    return text


def _int(path: Path, element: ET.Element, tag: str) -> int:
    text = _text(path, element, tag)
    if not text.isdigit() or int(text) < 1:
        raise VocFormatError(
            f"{path}: annotation.{tag.replace('/', '.')}: expected a positive integer, "
            f"got {_short(text)}"
        )
    return int(text)


def _number(path: Path, element: ET.Element, tag: str, where: str) -> float:
    text = _text(path, element, tag, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise VocFormatError(
            f"{path}: {where}.{tag.replace('/', '.')}: expected a number, got {_short(text)}"
        )
    return value
