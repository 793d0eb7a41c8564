"""Tests for dupr.data.bundled_eval: exact ground truth, determinism and caching of the sets."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from dupr.data.bundled import MANIFEST_NAME, bundled_photos
from dupr.data.bundled_eval import (
    SHAPES,
    bundled_classification_set,
    bundled_detection_set,
    silhouette,
)
from dupr.data.coco import CocoDetection, load_coco

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def detection_root() -> Path:
    """The default set, built in the session's DUPR_DATA_HOME (tests/conftest.py)."""
    return bundled_detection_set()


def tight_box(mask: torch.Tensor) -> list[float]:
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_silhouettes_are_distinct_shapes() -> None:
    masks = {shape: silhouette(shape, 64, 0.0) for shape in SHAPES}
    areas = {shape: mask.mean() for shape, mask in masks.items()}
    assert areas["disc"] == pytest.approx(np.pi / 4, abs=0.03)
    assert areas["square"] == pytest.approx(0.5, abs=0.03)
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.05, (a, b)


@pytest.mark.parametrize("split", ["train", "val"])
def test_detection_set_has_exact_ground_truth(detection_root: Path, split: str) -> None:
    coco = load_coco(detection_root / "annotations" / f"instances_{split}.json")
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    ds = CocoDetection(detection_root / split, coco, with_masks=True)
    ds.check_files()
    assert len(ds) == {"train": 96, "val": 32}[split]
    areas = {a["id"]: a["area"] for a in coco["annotations"]}
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    labels_seen: set[int] = set()
    for index in range(len(ds)):
        image, target = ds[index]
        height, width = image.shape[1:]
        assert 144 <= height <= 208 and 144 <= width <= 208
        masks, boxes = target["masks"], target["boxes"]
        assert 1 <= len(masks) <= 4
        assert int(masks.sum(dim=0).max()) == 1  # no two objects share a pixel
        for mask, box in zip(masks, boxes, strict=True):
            assert tight_box(mask) == box.tolist()
            side = max(box[2] - box[0], box[3] - box[1])
            assert 0.1 * min(height, width) <= side <= 0.46 * min(height, width)
        anns = [a for a in coco["annotations"] if a["image_id"] == target["image_id"]]
        assert [int(m.sum()) for m in masks] == [areas[a["id"]] for a in anns]
        labels_seen.update(target["labels"].tolist())
    assert labels_seen == set(range(1, len(SHAPES) + 1))


def contrast_and_flatness(root: Path, images: int = 8) -> tuple[float, float]:
    """Medians over objects of |mean inside - mean of the band around| (max over channels) and
    of the pixel std inside the object (mean over channels)."""
    ds = CocoDetection(root / "val", root / "annotations" / "instances_val.json", True)
    contrasts, spreads = [], []
    for index in range(images):
        image, target = ds[index]
        objects = target["masks"].bool()
        for mask in objects:
            # Background pixels in a 4-pixel band around the object's box.
            x1, y1, x2, y2 = (int(v) for v in tight_box(mask))
            near = torch.zeros_like(mask)
            near[max(0, y1 - 4) : y2 + 4, max(0, x1 - 4) : x2 + 4] = True
            near &= ~objects.any(dim=0)
            inside = image[:, mask].mean(dim=1)
            outside = image[:, near].mean(dim=1)
            contrasts.append(float((inside - outside).abs().max()))
            spreads.append(float(image[:, mask].std(dim=1).mean()))
    return float(np.median(contrasts)), float(np.median(spreads))


def test_default_objects_are_flat_colours_that_stand_out(detection_root: Path) -> None:
    """fill="solid" (the default): one colour per object, far from the background around it."""
    contrast, spread = contrast_and_flatness(detection_root)
    assert contrast > 0.2 and spread < 0.03


def test_textured_objects_are_cut_from_other_photos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fill="texture": the harder variant, objects carry photo texture and still stand out."""
    monkeypatch.setenv("DUPR_DATA_HOME", str(tmp_path))
    root = bundled_detection_set(num_train=1, num_val=8, fill="texture")
    contrast, spread = contrast_and_flatness(root)
    assert contrast > 0.05 and spread > 0.05


def test_second_call_is_fast_and_returns_the_same_path(detection_root: Path) -> None:
    start = time.perf_counter()
    again = bundled_detection_set()
    assert again == detection_root
    assert time.perf_counter() - start < 1.0
    manifest = json.loads((detection_root / MANIFEST_NAME).read_text())
    assert manifest["num_train"] == 96 and manifest["num_val"] == 32


def test_rebuild_is_byte_identical_and_repairs_a_damaged_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = []
    for home in ("a", "b"):
        monkeypatch.setenv("DUPR_DATA_HOME", str(tmp_path / home))
        roots.append(bundled_detection_set(num_train=10, num_val=5))
    a, b = roots
    assert a.name == b.name and a != b
    hashes = file_hashes(a)
    assert len(hashes) == 10 + 5 + 2 + 1  # images, two annotation files, manifest
    assert file_hashes(b) == hashes
    manifest = json.loads((a / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        assert hashes[entry["path"]] == entry["sha256"]

    # A truncated file makes the cached build incomplete: the next call rebuilds it in place.
    (b / "val" / "00002.jpg").write_bytes(b"")
    assert bundled_detection_set(num_train=10, num_val=5) == b
    assert file_hashes(b) == hashes


def test_other_arguments_give_another_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPR_DATA_HOME", str(tmp_path))
    first = bundled_classification_set(num_train_per_class=2, num_val_per_class=1, size=48)
    other = bundled_classification_set(num_train_per_class=2, num_val_per_class=1, size=48, seed=1)
    assert first != other
    name = sorted((first / "train").iterdir())[0].name
    key = f"train/{name}/0000.jpg"
    assert file_hashes(first)[key] != file_hashes(other)[key]


def test_classification_set_has_imagefolder_layout_one_class_per_photo() -> None:
    root = bundled_classification_set()
    photos = sorted(name for name, _ in bundled_photos())
    for split, per_class in (("train", 40), ("val", 20)):
        folder = ImageFolder(root / split)
        assert folder.classes == photos
        assert len(folder) == per_class * len(photos)
        counts = np.bincount([label for _, label in folder.samples], minlength=len(photos))
        assert counts.tolist() == [per_class] * len(photos)
        image, label = folder[0]
        assert image.size == (96, 96) and label == 0


def test_classification_set_makes_an_informative_probe() -> None:
    """Even random features separate the photos well above chance on held-out regions, so the
    probe can rank backbones (pasted shapes gave chance accuracy for every backbone)."""
    from dupr.backbone import ResNetBackbone
    from dupr.evaluation.linear_probe import linear_probe, probe_transform

    root = bundled_classification_set()
    transform = probe_transform(96)
    torch.manual_seed(0)
    accuracy = linear_probe(
        ResNetBackbone("resnet18").eval(),
        ImageFolder(root / "train", transform=transform),
        ImageFolder(root / "val", transform=transform),
        levels=(1, 3),
    )
    chance = 1 / len(ImageFolder(root / "val").classes)
    assert accuracy["conv3"] > 3 * chance and accuracy["conv5"] > 3 * chance


def test_bad_arguments_raise_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"^num_train must be an integer >= 1, got 0$"):
        bundled_detection_set(num_train=0)
    with pytest.raises(ValueError, match=r"^max_side must be an integer >= 144, got 100$"):
        bundled_detection_set(max_side=100)
    with pytest.raises(ValueError, match="size"):
        bundled_classification_set(size=8)
    with pytest.raises(ValueError, match=r"^fill='plain': expected one of texture, solid$"):
        bundled_detection_set(fill="plain")
    with pytest.raises(ValueError, match=r"^object_size=\(0.5, 0.2\): expected"):
        bundled_detection_set(object_size=(0.5, 0.2))
