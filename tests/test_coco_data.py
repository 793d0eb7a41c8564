"""Tests for dupr.data.coco: validation messages, targets, masks, flips and missing files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as mask_utils
from PIL import Image

from dupr.data.coco import CocoDetection, CocoFormatError, collate_detection, load_coco
from dupr.data.folder import ImageDecodeError

torch.set_num_threads(min(2, torch.get_num_threads()))

SIZES = {1: (20, 16), 2: (12, 10)}  # image id -> (width, height)


def rect_mask(width: int, height: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE, written by hand: column-major runs, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def tight_box(mask: torch.Tensor) -> list[float]:
    """xyxy pixel-edge box of a mask's pixels."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def make_coco() -> dict[str, Any]:
    compressed = mask_utils.encode(np.asfortranarray(rect_mask(12, 10, 1, 1, 4, 3)))
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 20, "height": 16},
            {"id": 2, "file_name": "sub/b.png", "width": 12, "height": 10},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {  # polygon covering columns 2..6 and rows 3..6
                "id": 10,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 3, 5, 4],
                "segmentation": [[2, 3, 7, 3, 7, 7, 2, 7]],
                "area": 20,
                "iscrowd": 0,
            },
            {  # uncompressed RLE, columns 10..13, rows 8..13
                "id": 11,
                "image_id": 1,
                "category_id": 3,
                "bbox": [10, 8, 4, 6],
                "segmentation": uncompressed_rle(rect_mask(20, 16, 10, 8, 4, 6)),
                "iscrowd": 0,
            },
            {  # a crowd region: kept for evaluation, left out of the training targets
                "id": 12,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 3, 3],
                "segmentation": uncompressed_rle(rect_mask(20, 16, 0, 0, 3, 3)),
                "iscrowd": 1,
            },
            {  # compressed RLE with str counts; no area or iscrowd (filled by load_coco)
                "id": 13,
                "image_id": 2,
                "category_id": 3,
                "bbox": [1, 1, 4, 3],
                "segmentation": {"size": [10, 12], "counts": compressed["counts"].decode()},
            },
        ],
    }


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for image_id, name in ((1, "a.png"), (2, "sub/b.png")):
        width, height = SIZES[image_id]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "instances.json").write_text(json.dumps(make_coco()))
    return tmp_path


def test_items_have_right_shapes_labels_boxes_and_masks(coco_dir: Path) -> None:
    ds = CocoDetection(coco_dir, coco_dir / "instances.json", with_masks=True)
    assert len(ds) == 2 and ds.image_ids == [1, 2]
    assert ds.num_classes == 2 and ds.category_ids == [3, 7]

    image, target = ds[0]
    expected = np.asarray(Image.open(coco_dir / "a.png"), dtype=np.float32) / 255.0
    assert image.dtype == torch.float32 and image.shape == (3, 16, 20)
    assert torch.allclose(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert target["image_id"] == 1
    # The crowd annotation (id 12) is not a target.
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2.0, 3.0, 7.0, 7.0], [10.0, 8.0, 14.0, 14.0]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2, 1]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 16, 20)
    assert torch.equal(masks[0], torch.from_numpy(rect_mask(20, 16, 2, 3, 5, 4)))
    assert torch.equal(masks[1], torch.from_numpy(rect_mask(20, 16, 10, 8, 4, 6)))
    for mask, box in zip(masks, target["boxes"], strict=True):
        assert tight_box(mask) == box.tolist()

    image, target = ds[1]
    assert image.shape == (3, 10, 12) and target["image_id"] == 2
    assert target["boxes"].tolist() == [[1.0, 1.0, 5.0, 4.0]]
    assert torch.equal(target["masks"][0], torch.from_numpy(rect_mask(12, 10, 1, 1, 4, 3)))

    # The crowd annotation stays in the validated dict; missing fields are filled in.
    anns = {a["id"]: a for a in ds.coco["annotations"]}
    assert anns[12]["iscrowd"] == 1
    assert anns[13]["iscrowd"] == 0 and anns[13]["area"] == 12.0


def test_without_masks_and_collate(coco_dir: Path) -> None:
    ds = CocoDetection(coco_dir, load_coco(coco_dir / "instances.json"))
    images, targets = collate_detection([ds[0], ds[1]])
    assert [tuple(i.shape) for i in images] == [(3, 16, 20), (3, 10, 12)]
    assert [t["image_id"] for t in targets] == [1, 2]
    assert all("masks" not in t for t in targets)


def test_hflip_flips_image_boxes_and_masks_together(coco_dir: Path) -> None:
    plain = CocoDetection(coco_dir, coco_dir / "instances.json", with_masks=True)
    flipped = CocoDetection(coco_dir, coco_dir / "instances.json", with_masks=True, hflip_prob=1.0)
    image, target = plain[0]
    image_f, target_f = flipped[0]
    assert torch.equal(image_f, image.flip(-1))
    assert target_f["boxes"].tolist() == [[13.0, 3.0, 18.0, 7.0], [6.0, 8.0, 10.0, 14.0]]
    assert torch.equal(target_f["masks"], target["masks"].flip(-1))
    for mask, box in zip(target_f["masks"], target_f["boxes"], strict=True):
        assert tight_box(mask) == box.tolist()
    assert torch.equal(target_f["labels"], target["labels"])


def test_hflip_is_random_across_calls_and_reproducible(coco_dir: Path) -> None:
    def flips(seed: int) -> list[bool]:
        ds = CocoDetection(coco_dir, coco_dir / "instances.json", hflip_prob=0.5, seed=seed)
        return [ds[0][1]["boxes"][0, 0].item() != 2.0 for _ in range(24)]

    first = flips(0)
    assert any(first) and not all(first)
    assert flips(0) == first
    assert flips(1) != first


def write_bad(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "instances_bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _without_categories() -> dict[str, Any]:
    coco = make_coco()
    del coco["categories"]
    return coco


def _zero_width() -> dict[str, Any]:
    coco = make_coco()
    coco["annotations"][1]["bbox"] = [10, 8, 0, 6]
    return coco


def _unknown_image() -> dict[str, Any]:
    coco = make_coco()
    coco["annotations"][2]["image_id"] = 99
    return coco


def _duplicate_image_id() -> dict[str, Any]:
    coco = make_coco()
    coco["images"][1]["id"] = 1
    return coco


def _bad_rle_size() -> dict[str, Any]:
    coco = make_coco()
    coco["annotations"][3]["segmentation"]["size"] = [12, 10]
    return coco


def _bad_difficult() -> dict[str, Any]:
    coco = make_coco()
    coco["annotations"][0]["difficult"] = "yes"  # PASCAL VOC's flag: 0 or 1
    return coco


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"images": [', "JSON"),
        ("[1, 2]", "top level"),
        (_without_categories(), "categories"),
        (_zero_width(), "annotations[1].bbox"),
        (_unknown_image(), "annotations[2].image_id"),
        (_duplicate_image_id(), "images[1].id"),
        (_bad_rle_size(), "annotations[3].segmentation.size"),
        (_bad_difficult(), "annotations[0].difficult: expected 0 or 1, got 'yes'"),
    ],
)
def test_load_coco_errors_are_one_line_and_name_file_and_field(
    tmp_path: Path, data: Any, field: str
) -> None:
    path = write_bad(tmp_path, data)
    with pytest.raises(CocoFormatError) as info:
        load_coco(path)
    message = str(info.value)
    assert "\n" not in message
    assert "instances_bad.json" in message and field in message


def test_load_coco_accepts_a_valid_dict_and_names_the_source() -> None:
    assert len(load_coco(make_coco())["annotations"]) == 4
    with pytest.raises(CocoFormatError, match=r"^my-set: annotations\[1\]\.bbox: "):
        load_coco(_zero_width(), source="my-set")


def test_missing_image_file_is_reported_by_check_files_and_getitem(coco_dir: Path) -> None:
    (coco_dir / "sub" / "b.png").unlink()
    ds = CocoDetection(coco_dir, coco_dir / "instances.json")
    with pytest.raises(FileNotFoundError) as info:
        ds.check_files()
    assert "b.png" in str(info.value) and "\n" not in str(info.value)
    ds[0]  # the other image still loads
    with pytest.raises(FileNotFoundError, match=r"sub/b\.png"):
        ds[1]


def test_corrupt_image_file_is_named(coco_dir: Path) -> None:
    (coco_dir / "a.png").write_bytes(b"not a png")
    ds = CocoDetection(coco_dir, coco_dir / "instances.json")
    ds.check_files()  # the file exists; only decoding fails
    with pytest.raises(ImageDecodeError, match=r"a\.png"):
        ds[0]


def test_check_images_decodes_every_image_and_names_the_first_broken_one(coco_dir: Path) -> None:
    ds = CocoDetection(coco_dir, coco_dir / "instances.json")
    ds.check_images(workers=2)  # both decode
    truncated = (coco_dir / "sub" / "b.png").read_bytes()[:-40]  # found only by decoding it
    (coco_dir / "sub" / "b.png").write_bytes(truncated)
    with pytest.raises(ImageDecodeError, match=r"sub/b\.png"):
        ds.check_images(workers=2)
    (coco_dir / "a.png").write_bytes(b"not a png")  # both broken: the first one is named
    for workers in (1, 2):
        with pytest.raises(ImageDecodeError, match=r"a\.png"):
            ds.check_images(workers=workers)
    (coco_dir / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        ds.check_images()
