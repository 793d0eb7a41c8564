"""Bundled, offline labelled sets for the evaluations of the paper's §4, composed from real photos.

Why composed: no installed package ships real photographs with boxes or class labels, and the
detection transfer (§4.1-§4.3) and linear-probe checks must run without internet. So objects with
exact ground truth are pasted onto real photographs (`dupr.data.bundled.bundled_photos()`):
each object is the silhouette of one of `SHAPES`, filled with one flat colour of random hue that
contrasts with the background under it (`fill="solid"`, the default) or with a texture cut from
a *different* photograph (`fill="texture"`), so that the class is carried by the shape and not
by colour or background. The flat fill is the default because the detection stage must rank
backbones at the demo's budget (150 fine-tuning iterations): on textured objects every
backbone, pre-trained or random, scored 1-2 AP there (noise); see the README's evidence. Objects
never overlap, so each object's mask is exactly its silhouette pixels and its box is the tight
box of that mask (COCO pixel-edge convention: `x` = leftmost column, `w` = rightmost - leftmost
+ 1).

`bundled_detection_set` writes a COCO-format set (`train/`, `val/`, `annotations/instances_*.json`
with compressed-RLE masks) and `bundled_classification_set` an ImageFolder layout
(`train/<class>/*.jpg`, `val/<class>/*.jpg`). Both are deterministic (only `rng.random()` is
drawn, whose stream NumPy keeps stable, so the same arguments and package versions give
byte-identical files), cached under `default_data_home()` in a folder named by a hash of the
arguments, written to a temporary sibling and renamed into place with `MANIFEST.json` last, so a
reader never sees a half-written set and a second call returns at once.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_utils
from PIL import Image, ImageDraw

from dupr.data.bundled import (
    MANIFEST_NAME,
    _read_manifest,
    _write_json_atomic,
    bundled_photos,
    default_data_home,
    manifest_matches,
    publish_folder,
)

logger = logging.getLogger(__name__)

EVAL_VERSION = 1
JPEG_QUALITY = 95
# The object categories, in category-id order (id = position + 1). Distinct silhouettes.
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "star", "cross")
MAX_OBJECTS = 4
PLACEMENT_TRIES = 50  # re-draws of an object's size/position before it is left out
# Object side as a fraction of the image's shorter side.
DETECTION_OBJECT_SIZE = (0.20, 0.45)
CLASSIFICATION_OBJECT_SIZE = (0.35, 0.70)
# Crop side as a fraction of the largest crop of the wanted aspect that fits in the photo.
BACKGROUND_SCALE = (0.35, 1.0)
TEXTURE_SCALE = (0.15, 0.60)
BRIGHTNESS_PROB = 0.5
BRIGHTNESS = (0.6, 1.4)
# fill="solid": one colour per object, of random hue, saturated, its brightness on the other
# side of mid-grey from the background under the object (high contrast).
FILLS = ("texture", "solid")
SOLID_SATURATION = (0.6, 1.0)
SOLID_VALUE_ON_DARK = (0.75, 1.0)  # background luminance below 128
SOLID_VALUE_ON_LIGHT = (0.1, 0.4)
STAR_INNER_RADIUS = 0.45
CROSS_HALF_WIDTH = 0.3

Photo = Image.Image


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(rng.random())


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high] from `rng.random()` (stable across NumPy versions)."""
    return min(high, low + math.floor(float(rng.random()) * (high - low + 1)))


def _unit_polygon(shape: str, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` inside the unit circle, rotated by `angle` radians."""
    if shape == "square":
        points = [(1.0, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        points = [(1.0, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        points = [
            (1.0 if k % 2 == 0 else STAR_INNER_RADIUS, -math.pi / 2 + k * math.pi / 5)
            for k in range(10)
        ]
    elif shape == "cross":
        # A plus sign whose outer corners lie on the unit circle.
        h = CROSS_HALF_WIDTH
        a = math.sqrt(1.0 - h * h)
        xy = [(a, -h), (a, h), (h, h), (h, a), (-h, a), (-h, h)]
        xy += [(-a, h), (-a, -h), (-h, -h), (-h, -a), (h, -a), (h, -h)]
        points = [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return [(r * math.cos(t + angle), r * math.sin(t + angle)) for r, t in points]


def silhouette(shape: str, side: int, angle: float = 0.0) -> np.ndarray:
    """A bool [side, side] mask of `shape` rotated by `angle`, rasterised by PIL without
    antialiasing, so that the mask is exactly the pixels that get painted."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "disc":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    else:
        centre, radius = (side - 1) / 2, (side - 1) / 2
        draw.polygon(
            [(centre + radius * x, centre + radius * y) for x, y in _unit_polygon(shape, angle)],
            fill=255,
        )
    return np.asarray(canvas) > 0


def paste_object(
    canvas: np.ndarray, local_mask: np.ndarray, x0: int, y0: int, texture: np.ndarray
) -> np.ndarray:
    """Paint `texture` into `canvas` (H, W, 3 uint8, in place) where the silhouette `local_mask`
    lies at (x0, y0); return the object's full-image bool mask. Shared by both sets."""
    side_h, side_w = local_mask.shape
    window = canvas[y0 : y0 + side_h, x0 : x0 + side_w]
    window[local_mask] = texture[local_mask]
    mask = np.zeros(canvas.shape[:2], dtype=bool)
    mask[y0 : y0 + side_h, x0 : x0 + side_w] = local_mask
    return mask


def _random_crop(
    rng: np.random.Generator,
    photo: Photo,
    size: tuple[int, int],
    scale: tuple[float, float],
    resample: Image.Resampling,
) -> Image.Image:
    """A crop of `photo` with the aspect of `size` at a random scale and position, resized."""
    out_w, out_h = size
    aspect = out_w / out_h
    max_w = min(float(photo.width), photo.height * aspect)
    s = _uniform(rng, *scale)
    crop_w = max(1.0, max_w * s)
    crop_h = max(1.0, crop_w / aspect)
    x0 = _uniform(rng, 0.0, photo.width - crop_w)
    y0 = _uniform(rng, 0.0, photo.height - crop_h)
    return photo.resize(size, resample, box=(x0, y0, x0 + crop_w, y0 + crop_h))


def _texture(
    rng: np.random.Generator, photos: list[Photo], background: int, side: int
) -> np.ndarray:
    """A side x side texture from a photo other than the background one, maybe re-lit."""
    index = (background + 1 + _randint(rng, 0, len(photos) - 2)) % len(photos)
    crop = _random_crop(rng, photos[index], (side, side), TEXTURE_SCALE, Image.Resampling.BILINEAR)
    texture = np.asarray(crop, dtype=np.uint8)
    if rng.random() < BRIGHTNESS_PROB:
        factor = _uniform(rng, *BRIGHTNESS)
        texture = np.clip(np.rint(texture.astype(np.float64) * factor), 0, 255).astype(np.uint8)
    return texture


def _solid(rng: np.random.Generator, window: np.ndarray, local_mask: np.ndarray) -> np.ndarray:
    """A flat colour texture that contrasts with the background pixels under the silhouette."""
    under = window[local_mask].astype(np.float64)
    luminance = float((under @ np.array([0.299, 0.587, 0.114])).mean())
    hue = float(rng.random())
    saturation = _uniform(rng, *SOLID_SATURATION)
    value = _uniform(rng, *(SOLID_VALUE_ON_DARK if luminance < 128 else SOLID_VALUE_ON_LIGHT))
    colour = np.rint(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    return np.broadcast_to(colour.astype(np.uint8), (*local_mask.shape, 3))


def _compose(
    rng: np.random.Generator,
    photos: list[Photo],
    size: tuple[int, int],
    shapes: list[int],
    object_size: tuple[float, float],
    fill: str = "texture",
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """A background crop with the objects `shapes` (indices into SHAPES) pasted without overlap.

    Each object is filled with a texture cut from another photo (`fill="texture"`) or with one
    flat, contrasting colour (`fill="solid"`).

    An object whose placement fails `PLACEMENT_TRIES` times is left out (never the first one,
    which always fits on an empty canvas). Returns the image and (shape index, mask) per object.
    """
    background = _randint(rng, 0, len(photos) - 1)
    image = _random_crop(rng, photos[background], size, BACKGROUND_SCALE, Image.Resampling.BICUBIC)
    canvas = np.array(image, dtype=np.uint8)
    width, height = size
    occupied = np.zeros((height, width), dtype=bool)
    objects: list[tuple[int, np.ndarray]] = []
    shorter = min(width, height)
    for shape in shapes:
        for _ in range(PLACEMENT_TRIES):
            side = max(8, round(_uniform(rng, *object_size) * shorter))
            angle = _uniform(rng, 0.0, 2 * math.pi)
            x0 = _randint(rng, 0, width - side)
            y0 = _randint(rng, 0, height - side)
            local = silhouette(SHAPES[shape], side, angle)
            if not (occupied[y0 : y0 + side, x0 : x0 + side] & local).any():
                break
        else:
            continue
        if fill == "solid":
            texture = _solid(rng, canvas[y0 : y0 + side, x0 : x0 + side], local)
        else:
            texture = _texture(rng, photos, background, side)
        mask = paste_object(canvas, local, x0, y0, texture)
        occupied |= mask
        objects.append((shape, mask))
    return canvas, objects


def _jpeg_bytes(canvas: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _tight_bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of the mask's pixels (pixel-edge convention, w = right - left + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x, y = int(cols[0]), int(rows[0])
    return [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE with `counts` as str (JSON-safe), via faster-coco-eval's encoder."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]


# ---- caching: hashed folder, temporary sibling, manifest last, atomic rename --------------------


def _cache_root(kind: str, spec: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return default_data_home() / f"bundled-{kind}-v{EVAL_VERSION}-{digest}"


def _is_our_leftover(root: Path, spec: dict[str, Any]) -> bool:
    """Whether `root` is a stale or partial build of this kind (so it may be deleted).

    True when its manifest names our format, or (no manifest) it only holds the .jpg/.json files
    a build writes; this keeps a mistaken `root` of someone else's files from being deleted.
    """
    if not root.is_dir() or root.is_symlink():
        return False
    manifest = _read_manifest(root)
    if manifest is not None:
        return manifest.get("format") == spec["format"]
    return all(
        (p.is_dir() and not p.is_symlink()) or (p.is_file() and p.suffix in (".jpg", ".json"))
        for p in root.rglob("*")
    )


def _build(
    kind: str,
    spec: dict[str, Any],
    write: Callable[[Path, list[Photo], list[dict[str, Any]]], None],
) -> Path:
    """Return the cached build of `spec`, or run `write(tmp, photos, files)` and publish it.

    `write` fills `files` with one {path, bytes, sha256} entry per file it writes.
    """
    root = _cache_root(kind, spec).absolute()
    if manifest_matches(root, spec):
        return root
    named = _photos()
    photos = [photo for _, photo in named]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files: list[dict[str, Any]] = []
        write(tmp, photos, files)
        manifest = {**spec, "photos": [name for name, _ in named], "files": files}
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        publish_folder(
            tmp,
            root,
            lambda r: manifest_matches(r, spec),
            lambda r: _is_our_leftover(r, spec),
            "bundled evaluation data",
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("bundled evaluation data: wrote %d files to %s", len(files), root)
    return root


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, Photo], ...]:
    """The bundled photos, decoded once per process (about 4 s; ~15 MB kept), since building
    several sets in one process, as tests do, would otherwise decode them again each time."""
    return tuple(bundled_photos())


def _write_file(tmp: Path, relative: str, data: bytes, files: list[dict[str, Any]]) -> None:
    path = tmp / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    files.append({"path": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---- the two sets -------------------------------------------------------------------------------


def _detection_split(
    tmp: Path,
    photos: list[Photo],
    files: list[dict[str, Any]],
    split: int,
    name: str,
    count: int,
    spec: dict[str, Any],
) -> None:
    """Write `count` images of one split and its COCO instances file."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for k in range(count):
        rng = np.random.default_rng([spec["seed"], 0, split, k])
        width = _randint(rng, spec["min_side"], spec["max_side"])
        height = _randint(rng, spec["min_side"], spec["max_side"])
        num_objects = _randint(rng, 1, spec["max_objects"])
        # The first object cycles through the categories, so every one occurs in any split of
        # at least len(SHAPES) images; the others are random.
        shapes = [k % len(SHAPES)] + [
            _randint(rng, 0, len(SHAPES) - 1) for _ in range(num_objects - 1)
        ]
        canvas, objects = _compose(
            rng, photos, (width, height), shapes, tuple(spec["object_size"]), spec["fill"]
        )
        file_name = f"{k:05d}.jpg"
        _write_file(tmp, f"{name}/{file_name}", _jpeg_bytes(canvas), files)
        images.append({"id": k + 1, "file_name": file_name, "width": width, "height": height})
        for shape, mask in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": shape + 1,
                    "bbox": _tight_bbox(mask),
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(mask),
                }
            )
    coco = {
        "info": {
            "description": f"dupr bundled detection set ({name}), composed offline",
            "version": str(EVAL_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }
    data = (json.dumps(coco, sort_keys=True) + "\n").encode("utf-8")
    _write_file(tmp, f"annotations/instances_{name}.json", data, files)


def bundled_detection_set(
    num_train: int = 96,
    num_val: int = 32,
    min_side: int = 144,
    max_side: int = 208,
    seed: int = 0,
    fill: str = "solid",
    max_objects: int = MAX_OBJECTS,
    object_size: tuple[float, float] = DETECTION_OBJECT_SIZE,
) -> Path:
    """The bundled COCO-format detection set, built on first use; returns its root folder.

    Layout: `train/`, `val/` (JPEG, quality 95) and `annotations/instances_{train,val}.json`.
    Each image (width and height each in [min_side, max_side]) is a random crop of one photo
    with 1 to `max_objects` non-overlapping objects whose side is a fraction `object_size` (by
    default 20-45%) of the shorter image side, filled as `fill` says ("solid" or "texture", see
    the module's docstring); masks are compressed RLE, boxes the tight boxes of the masks,
    categories `SHAPES` (ids 1..5).
    """
    _check_int("num_train", num_train, 1)
    _check_int("num_val", num_val, 1)
    _check_int("min_side", min_side, 32)
    _check_int("max_side", max_side, min_side)
    _check_int("seed", seed, 0)
    _check_int("max_objects", max_objects, 1)
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}: expected one of {', '.join(FILLS)}")
    low, high = (float(v) for v in object_size)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"object_size={object_size!r}: expected 0 < low <= high <= 1")
    spec = {
        "format": "dupr-bundled-detection",
        "version": EVAL_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "min_side": min_side,
        "max_side": max_side,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
        "shapes": list(SHAPES),
        "object_size": [low, high],
        "fill": fill,
        "max_objects": max_objects,
    }

    def write(tmp: Path, photos: list[Photo], files: list[dict[str, Any]]) -> None:
        _detection_split(tmp, photos, files, 0, "train", num_train, spec)
        _detection_split(tmp, photos, files, 1, "val", num_val, spec)

    return _build("detection", spec, write)


# Train crops come from the left part of each photo, validation crops from the rest, so no
# validation pixel was seen in training.
CLASSIFICATION_SPLIT_X = 0.6
CLASSIFICATION_CROP_SCALE = (0.3, 0.8)


def bundled_classification_set(
    num_train_per_class: int = 40,
    num_val_per_class: int = 20,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """The bundled classification set for the linear probe, built on first use; returns its root.

    One class per bundled photograph (scene recognition: its label needs the image-level
    content that VOC07 classification needs in the paper's Table VI b). Shapes pasted on
    backgrounds were tried first and gave chance accuracy at every level whatever the
    backbone, since globally pooled features do not carry an object's outline: an
    uninformative probe. Train images are random crops (30-80% of the region's side, random
    position, horizontal flip half the time) of the left `CLASSIFICATION_SPLIT_X` of each
    photo, validation images of the right part. Layout (torchvision ImageFolder):
    `train/<photo>/NNNN.jpg`, `val/<photo>/NNNN.jpg`, square `size` images.
    """
    _check_int("num_train_per_class", num_train_per_class, 1)
    _check_int("num_val_per_class", num_val_per_class, 1)
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    spec = {
        "format": "dupr-bundled-classification",
        "version": EVAL_VERSION + 1,  # 2: classes are photos (1 was pasted shapes)
        "num_train_per_class": num_train_per_class,
        "num_val_per_class": num_val_per_class,
        "size": size,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
        "split_x": CLASSIFICATION_SPLIT_X,
        "crop_scale": list(CLASSIFICATION_CROP_SCALE),
    }

    def write(tmp: Path, photos: list[Photo], files: list[dict[str, Any]]) -> None:
        names = [name for name, _ in _photos()]
        splits = (
            ("train", num_train_per_class, 0.0, CLASSIFICATION_SPLIT_X),
            ("val", num_val_per_class, CLASSIFICATION_SPLIT_X, 1.0),
        )
        for split, (name, count, left, right) in enumerate(splits):
            for c, photo in enumerate(photos):
                region = photo.crop(
                    (round(left * photo.width), 0, round(right * photo.width), photo.height)
                )
                for k in range(count):
                    rng = np.random.default_rng([seed, 2, split, c, k])
                    crop = _random_crop(
                        rng,
                        region,
                        (size, size),
                        CLASSIFICATION_CROP_SCALE,
                        Image.Resampling.BICUBIC,
                    )
                    if rng.random() < 0.5:
                        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    data = _jpeg_bytes(np.asarray(crop, dtype=np.uint8))
                    _write_file(tmp, f"{name}/{names[c]}/{k:04d}.jpg", data, files)

    return _build("classification", spec, write)
