"""Detectors built from a pre-trained ResNet state, and their fine-tuning and evaluation loop."""

from __future__ import annotations

import dataclasses
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from dupr.config import ConfigError
from dupr.evaluation.detectors import DETECTORS, build_detector, trunk_norms
from dupr.evaluation.finetune import DetectionConfig, evaluate, finetune, hflip, predict
from dupr.sync_batchnorm import SyncBatchNorm

SIZE = 128
CATEGORY_IDS = [3, 7]  # non-contiguous on purpose: label l is category CATEGORY_IDS[l - 1]


class Rectangles(torch.utils.data.Dataset):
    """Bright rectangles on noise: class 1 is red, class 2 is green; exact boxes and masks.

    Every side is 34..51 px, so all objects are COCO "medium" (32² < area < 96²).
    """

    def __init__(self, n: int = 4, seed: int = 0, nan_image: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items, images, annotations = [], [], []
        self.category_ids, self.num_classes = list(CATEGORY_IDS), 2
        for i in range(n):
            image = torch.rand(3, SIZE, SIZE, generator=g) * 0.3
            boxes, labels = [], []
            for label in (1, 2):
                w, h = (int(v) for v in torch.randint(34, 52, (2,), generator=g))
                x = int(torch.randint(0, SIZE - w, (), generator=g))
                y = SIZE // 2 * (label - 1) + int(torch.randint(0, SIZE // 2 - h, (), generator=g))
                image[label - 1, y : y + h, x : x + w] = 1.0
                boxes.append([x, y, x + w, y + h])
                labels.append(label)
                annotations.append(
                    dict(
                        id=len(annotations) + 1,
                        image_id=100 + i,
                        category_id=CATEGORY_IDS[label - 1],
                        bbox=[x, y, w, h],
                        area=w * h,
                        iscrowd=0,
                        segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]],
                    )
                )
            if nan_image:
                image[0, 0, 0] = math.nan
            masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes):
                masks[j, y1:y2, x1:x2] = 1
            target = dict(
                boxes=torch.tensor(boxes, dtype=torch.float32),
                labels=torch.tensor(labels),
                masks=masks,
                image_id=100 + i,
            )
            self.items.append((image, target))
            images.append(dict(id=100 + i, width=SIZE, height=SIZE, file_name=f"{i}.png"))
        categories = [dict(id=c, name=f"class{c}") for c in CATEGORY_IDS]
        self.coco = dict(images=images, annotations=annotations, categories=categories)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state without fc, with non-default BN statistics to recognise."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.normal_(0, 0.1)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# Small proposal/RoI counts keep the two-stage detectors fast on the CPU.
TWO_STAGE = dict(DetectionConfig.cpu_friendly().overrides)


def small(name: str, state=None, norm: str = "sync_bn", **extra):
    overrides = {} if name == "retinanet_fpn" else dict(TWO_STAGE)
    overrides.update(extra)
    return build_detector(name, "resnet18", 2, state, norm, SIZE, SIZE, **overrides)


def trunk_and_res5(model):
    """(trunk with conv1, module holding the pre-trained layer4) for FPN and C4 detectors."""
    if hasattr(model.backbone, "body"):
        return model.backbone.body, model.backbone.body
    return model.backbone, model.roi_heads.box_head


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_loads_state_trains_and_predicts(name):
    state = resnet18_state()
    model = small(name, state)
    trunk, res5 = trunk_and_res5(model)
    assert torch.equal(trunk.conv1.weight, state["conv1.weight"])
    assert torch.equal(res5.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(res5.layer4[0].bn1.running_mean, state["layer4.0.bn1.running_mean"])

    data = Rectangles(2)
    images = [img for img, _ in data]
    targets = [t for _, t in data]
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert ("loss_mask" in losses) == (name == "mask_rcnn_fpn")
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    expected = {"boxes", "labels", "scores"} | ({"masks"} if name == "mask_rcnn_fpn" else set())
    assert set(out[0]) == expected


@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "faster_rcnn_c4"])
def test_norm_modes(name):
    state = resnet18_state()
    frozen = small(name, state, norm="frozen_bn")
    norms = trunk_norms(frozen)
    assert len(norms) == 20 and all(type(m) is FrozenBatchNorm2d for m in norms)
    _, res5 = trunk_and_res5(frozen)
    # FrozenBN carries the pre-trained statistics.
    assert torch.equal(res5.layer4[0].bn1.running_var, state["layer4.0.bn1.running_var"])

    synced = small(name, state, norm="sync_bn")
    assert all(type(m) is SyncBatchNorm for m in trunk_norms(synced))
    if name == "faster_rcnn_c4":
        assert isinstance(synced.roi_heads.box_head.norm, SyncBatchNorm)
        assert synced.roi_heads.box_head.norm.num_features == 512
        assert isinstance(frozen.roi_heads.box_head.norm, torch.nn.Identity)


@pytest.mark.parametrize("name", ["faster_rcnn_c4", "retinanet_fpn"])
def test_bad_states_raise_naming_the_key(name):
    state = resnet18_state()
    # layer4 is the C4 box head: its keys must be required there too.
    missing = {k: v for k, v in state.items() if k != "layer4.1.conv2.weight"}
    with pytest.raises(ValueError, match=r"missing keys \[layer4\.1\.conv2\.weight\]") as err:
        small(name, missing)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unexpected keys .*module.extra"):
        small(name, {**state, "module.extra": torch.zeros(1)})
    bad_shape = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"conv1\.weight.*\(64, 3, 3, 3\)"):
        small(name, bad_shape)


# The two kinds of head box_maths_in_float32 knows (R-CNN's two stages, RetinaNet's one), on one
# 64 px image: a CPU without bfloat16 instructions runs bfloat16 convolutions slowly (5 s for an
# FPN detector at 128 px, 28 s for R50-C4's res5 box head).
@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "retinanet_fpn"])
def test_boxes_stay_float32_under_autocast(name):
    """Fine-tuning on a GPU autocasts to bfloat16 (DetectionConfig.amp). The anchors, the heads'
    box outputs and the proposals stay float32, as in detectron2: in bfloat16 a coordinate near
    1,000 is placed to the nearest 4 px. The anchors equal those of a float32 pass."""
    overrides = {} if name == "retinanet_fpn" else TWO_STAGE
    model = build_detector(name, "resnet18", 2, None, "sync_bn", 64, 64, **overrides).train()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    rpn = None if name == "retinanet_fpn" else model.rpn
    anchors, dtypes = [], set()
    (rpn or model).anchor_generator.register_forward_hook(lambda m, a, out: anchors.append(out))
    # Registered after the detector's own hooks, so these see what the losses and NMS see.
    head = model.head if rpn is None else rpn.head
    head.register_forward_hook(
        lambda m, a, out: dtypes.update(
            t.dtype for part in (out.values() if isinstance(out, dict) else out) for t in part
        )
    )
    if rpn is not None:
        rpn.register_forward_hook(lambda m, a, out: dtypes.update(p.dtype for p in out[0]))
        model.roi_heads.box_predictor.register_forward_hook(
            lambda m, a, out: dtypes.update(t.dtype for t in out)
        )
    model(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert dtypes == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(anchors[0], anchors[1], strict=True))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_unknown_names_list_valid_values():
    with pytest.raises(ValueError, match="detector='yolo'.*" + ".*".join(DETECTORS)):
        build_detector("yolo", "resnet18", 2)
    with pytest.raises(ValueError, match="norm='group'.*sync_bn, frozen_bn"):
        build_detector("faster_rcnn_fpn", "resnet18", 2, norm="group")
    with pytest.raises(ValueError, match="arch='vgg16'.*resnet50"):
        build_detector("faster_rcnn_fpn", "vgg16", 2)
    with pytest.raises(ValueError, match="rpn_batch_size_per_image.*retinanet_fpn"):
        build_detector("retinanet_fpn", "resnet18", 2, rpn_batch_size_per_image=8)


def test_hflip_mirrors_boxes_and_masks():
    image, target = Rectangles(1)[0]
    before = target["boxes"].clone()
    flipped, ft = hflip(image, target)
    x1, y1, x2, y2 = ft["boxes"][0].int().tolist()
    assert flipped[0, y1:y2, x1:x2].min() == 1.0  # the red rectangle is still under its box
    assert ft["masks"][0, y1:y2, x1:x2].all() and ft["masks"][0].sum() == target["masks"][0].sum()
    assert torch.equal(target["boxes"], before)  # the dataset's target is left untouched
    assert torch.equal(ft["boxes"][:, [0, 2]], SIZE - before[:, [2, 0]])


def test_finetune_lowers_loss_then_predict_and_evaluate():
    torch.manual_seed(0)
    # RetinaNet: the cheapest detector here, and its loss falls steadily (a two-stage total
    # loss is noisier early on, as box regression grows with the number of positives).
    model = small("retinanet_fpn", resnet18_state(), score_thresh=0.001)
    data = Rectangles(4)
    cfg = DetectionConfig.cpu_friendly("retinanet_fpn", iterations=30)
    logs: list[tuple[int, dict[str, float]]] = []
    final = finetune(model, data, cfg, "cpu", on_log=lambda i, m: logs.append((i, m)))
    assert [i for i, _ in logs] == [10, 20, 30]
    assert final == logs[-1][1] and math.isfinite(final["loss"]) and final["lr"] > 0
    assert set(final) == {"loss", "classification", "bbox_regression", "lr"}
    assert logs[-1][1]["loss"] < 0.75 * logs[0][1]["loss"], logs
    assert model.training  # left in training mode, as finetune found it

    preds = predict(model, data, "cpu")
    assert preds and model.training
    assert {p["category_id"] for p in preds} <= set(CATEGORY_IDS)
    for p in preds:
        assert p["image_id"] in {100, 101, 102, 103}
        x, y, w, h = p["bbox"]
        assert w >= 0 and h >= 0 and 0 <= x <= SIZE and 0 <= y <= SIZE
        assert 0 <= p["score"] <= 1 and "segmentation" not in p

    metrics = evaluate(model, data, "cpu", voc=True)
    expected = {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert set(metrics) == expected | {"voc/AP", "voc/AP50", "voc/AP75"}
    # All objects are medium: COCOeval has no small or large ones and reports NaN for them.
    assert math.isnan(metrics.pop("bbox/APs")) and math.isnan(metrics.pop("bbox/APl"))
    assert metrics["bbox/APm"] == metrics["bbox/AP"]
    assert all(0 <= v <= 1 for v in metrics.values()), metrics
    assert metrics["bbox/AP50"] > 0 and metrics["voc/AP50"] > 0


def test_mask_model_predicts_rle_and_evaluates_segm():
    torch.manual_seed(0)
    model = small("mask_rcnn_fpn", resnet18_state(), box_score_thresh=0.0).eval()
    data = Rectangles(2)
    preds = predict(model, data, "cpu")
    assert preds and not model.training
    for p in preds:
        assert p["category_id"] in CATEGORY_IDS
        assert p["segmentation"]["size"] == [SIZE, SIZE]
        assert isinstance(p["segmentation"]["counts"], str)
    metrics = evaluate(model, data, "cpu")
    assert {"bbox/AP", "segm/AP", "segm/AP50", "segm/AP75"} <= set(metrics)
    assert all(0 <= v <= 1 for k, v in metrics.items() if k[-3:] not in ("APs", "APl"))


class Oracle(torch.nn.Module):
    """A stand-in detector that returns the ground truth of each image it is shown."""

    def __init__(self, data: Rectangles) -> None:
        super().__init__()
        self.data = data
        self.roi_heads = SimpleNamespace(has_mask=lambda: True)

    def forward(self, images):
        outputs = []
        for image in images:
            target = next(t for img, t in self.data if torch.equal(img, image))
            n = len(target["labels"])
            outputs.append(
                dict(
                    boxes=target["boxes"],
                    labels=target["labels"],
                    scores=torch.linspace(0.9, 0.5, n),
                    masks=target["masks"][:, None].float(),
                )
            )
        return outputs


def test_predict_maps_labels_and_boxes_to_coco_results():
    data = Rectangles(3)
    preds = predict(Oracle(data), data, "cpu", batch_size=2)
    annotations = data.coco["annotations"]
    assert len(preds) == len(annotations)
    for pred, ann in zip(preds, annotations, strict=True):
        assert pred["image_id"] == ann["image_id"]
        assert pred["category_id"] == ann["category_id"]  # label l -> category_ids[l - 1]
        assert pred["bbox"] == pytest.approx(ann["bbox"])  # xyxy -> xywh
    metrics = evaluate(Oracle(data), data, "cpu", voc=True)
    for key in ("bbox/AP", "segm/AP", "voc/AP"):
        assert metrics[key] == pytest.approx(1.0), key


def test_finetune_is_deterministic_and_rejects_non_finite_loss():
    cfg = DetectionConfig.cpu_friendly("retinanet_fpn", iterations=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = cfg.build("resnet18", 2, resnet18_state())
        runs.append(finetune(model, Rectangles(2), cfg, "cpu", log_every=1))
    assert runs[0] == runs[1]
    with pytest.raises(FloatingPointError, match="iteration 1: non-finite loss") as err:
        finetune(model, Rectangles(2, nan_image=True), cfg, "cpu")
    assert "\n" not in str(err.value)


def test_a_resumed_finetuning_continues_bit_for_bit():
    """Stopped after any iteration and resumed from its checkpoint (saved and loaded as the
    detection stage stores it), the fine-tuning ends with the same weights and logs as one that
    never stopped: data order across passes, flips, multi-scale and RoI draws, momenta, the
    learning-rate schedule and a logging window left open."""
    cfg = dataclasses.replace(
        DetectionConfig.cpu_friendly("faster_rcnn_fpn", iterations=5), min_size=(96, 128)
    )
    data = Rectangles(3)  # batches of 2 over 3 images: passes end mid-batch

    def run(resume=None):
        torch.manual_seed(0)
        model = cfg.build("resnet18", 2, resnet18_state())
        states, logs = [], []

        def store(state):  # as the stage does: serialised at once (its tensors are live)
            stored = io.BytesIO()
            torch.save(state, stored)
            states.append(stored.getvalue())

        finetune(
            model,
            data,
            cfg,
            "cpu",
            on_log=lambda i, m: logs.append((i, m)),
            log_every=2,
            resume=resume,
            on_checkpoint=store,
            checkpoint_every_s=0.0,
        )
        return model.state_dict(), states, logs

    weights, stored, logs = run()
    states = [torch.load(io.BytesIO(state)) for state in stored]
    assert [s["iteration"] for s in states] == [1, 2, 3, 4, 5]
    # After iteration 3, its logging window half full.
    resumed, later, resumed_logs = run(states[2])
    assert [torch.load(io.BytesIO(s))["iteration"] for s in later] == [4, 5]
    assert resumed_logs == logs[1:]  # iteration 4's window; iteration 5's
    for name, value in weights.items():
        assert torch.equal(resumed[name], value), name
    with pytest.raises(ValueError, match="iteration 6, outside 0..5"):
        finetune(cfg.build("resnet18", 2), data, cfg, "cpu", resume={**states[0], "iteration": 6})


def test_config_validation_and_schedule():
    for cfg in (DetectionConfig(), DetectionConfig.coco(), DetectionConfig.cpu_friendly()):
        assert cfg.validate() is cfg
    cases = {
        "iterations": 0,
        "detector": "yolo",
        "norm": "bn",
        "lr": 0.0,
        "lr_steps": (0.9, 0.5),
        "hflip_prob": 1.5,
        "min_size": (0, 800),
        "warmup_iters": 10**9,
        "batch_size": 0,
    }
    for name, value in cases.items():
        cfg = DetectionConfig(**{name: value})
        with pytest.raises(ConfigError, match=rf"^detection\.{name}=") as err:
            cfg.validate()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"detection\.iterations=0: must be >= 1"):
        DetectionConfig(iterations=0).validate()

    cfg = DetectionConfig()  # 24k iterations, warm-up 100, steps at 18k and 22k
    assert cfg.lr_factor(0) == pytest.approx(0.001)
    assert cfg.lr_factor(50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert cfg.lr_factor(100) == 1.0 and cfg.lr_factor(17999) == 1.0
    assert cfg.lr_factor(18000) == pytest.approx(0.1)
    assert cfg.lr_factor(22000) == pytest.approx(0.01)
