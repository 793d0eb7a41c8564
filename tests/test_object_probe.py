"""The object-level probe: a linear classifier on frozen RoIAlign features of ground-truth boxes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from dupr.backbone import ResNetBackbone
from dupr.data.coco import CocoDetection
from dupr.evaluation.object_probe import box_features, object_probe

COLOURS = {1: (220, 30, 30), 2: (30, 30, 220)}  # category id -> square colour


def coloured_squares(root, name: str, n: int, seed: int) -> CocoDetection:
    """n 64×64 grey images with two squares each, class = colour: a set any backbone can probe."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir()
    images, annotations = [], []
    for i in range(n):
        canvas = np.full((64, 64, 3), 128, np.uint8)
        for k, (x, y) in enumerate(((4, 4), (36, 36))):
            cat = int(rng.integers(1, 3))
            side = int(rng.integers(16, 25))
            canvas[y : y + side, x : x + side] = COLOURS[cat]
            box = [x, y, side, side]
            annotations.append(
                {"id": 2 * i + k + 1, "image_id": i + 1, "category_id": cat, "bbox": box}
                | {"area": side * side, "iscrowd": 0}
            )
        Image.fromarray(canvas).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
    categories = [{"id": c, "name": f"c{c}"} for c in COLOURS]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / f"{name}.json").write_text(json.dumps(coco))
    return CocoDetection(folder, root / f"{name}.json")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    return coloured_squares(root, "train", 8, seed=0), coloured_squares(root, "val", 4, seed=1)


@pytest.fixture(scope="module")
def resnet18() -> ResNetBackbone:
    torch.manual_seed(0)
    return ResNetBackbone("resnet18").eval()


def test_one_row_per_box_pooled_like_the_patch_head(resnet18, squares):
    train, _ = squares
    feats, labels = box_features(resnet18, train, levels=(0, 3), roi_size=2)
    assert sorted(feats) == [0, 3] and len(labels) == 16
    assert feats[0].shape == (16, 64 * 4) and feats[3].shape == (16, 512 * 4)
    image, target = train[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((image - mean.view(3, 1, 1)) / std.view(3, 1, 1))[None]
    with torch.no_grad():
        conv2 = resnet18(x, up_to=0)[0]
    expected = roi_align(conv2, [target["boxes"]], 2, 1 / 4, 2, aligned=False).flatten(1)
    np.testing.assert_allclose(feats[0][:2], expected.double().numpy(), rtol=1e-5, atol=1e-6)
    assert labels[:2].tolist() == target["labels"].tolist()


def test_probe_reads_the_class_from_the_boxes_and_is_deterministic(resnet18, squares):
    # Colour is linearly readable from conv2 of any backbone, even a random one; deeper levels
    # of a random one blur it (conv5's stride is wider than these squares).
    accuracy = object_probe(resnet18, *squares, C=(0.1, 1.0), seed=3)
    assert list(accuracy) == ["conv2", "conv3", "conv4", "conv5"]
    assert accuracy["conv2"] == 1.0 and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert object_probe(resnet18, *squares, C=(0.1, 1.0), seed=3) == accuracy


def test_resized_images_scale_their_boxes(resnet18, squares):
    train, _ = squares
    native, _ = box_features(resnet18, train, levels=(1,), roi_size=1)
    doubled, _ = box_features(resnet18, train, levels=(1,), roi_size=1, image_size=128)
    assert native[1].shape == doubled[1].shape  # same boxes, pooled on the resized image
    with pytest.raises(ValueError, match="levels"):
        box_features(resnet18, train, levels=(4,))
