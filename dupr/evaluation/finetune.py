"""Detection fine-tuning and evaluation of a built detector (paper §4.1–4.2, Tables I–III).

The loop is detectron2's, which the paper uses through MoCo's configurations: iteration-based
SGD over an endlessly cycled, reshuffled data stream, a linear warm-up, then the learning rate
×0.1 at fixed fractions of the run (VOC C4: 18k and 22k of 24k iterations; COCO 1×: 60k and 80k
of 90k), and horizontal flips as the only augmentation besides torchvision's multi-scale resize.
Evaluation produces COCO-format results and scores them with `dupr.evaluation.coco_metrics`
(COCO AP) and, for VOC, `dupr.evaluation.voc_metrics` (detectron2's VOC AP).

The dataset protocol: `dataset[i] -> (image float [3,H,W] in [0,1], target)` with target boxes
(float [N,4] xyxy), labels (int64 1..C), optional masks (uint8 [N,H,W]) and image_id; the
attributes `coco` (ground-truth dict), `num_classes` and `category_ids` (label l is category
`category_ids[l - 1]`). `dupr.data.coco.CocoDetection` implements it; build it with
`hflip_prob=0` for fine-tuning, since `finetune` flips by `DetectionConfig.hflip_prob` itself.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from dupr.config import ConfigError
from dupr.evaluation.coco_metrics import coco_metrics, masks_to_rle
from dupr.evaluation.detectors import DETECTORS, NORMS, build_detector, check_overrides
from dupr.evaluation.voc_metrics import voc_metrics

# RoI and proposal counts that make the two-stage detectors usable on a CPU (the torchvision
# defaults cost ~60 s per C4 iteration there); RetinaNet takes different constructor arguments.
_CPU_TWO_STAGE = dict(
    rpn_pre_nms_top_n_train=300,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=100,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=64,
    box_detections_per_img=50,
)
_CPU_RETINANET = dict(topk_candidates=300, detections_per_img=50)


def _sizes(lo: int, hi: int, step: int = 32) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1, step))


@dataclass
class DetectionConfig:
    """Fine-tuning settings; the defaults are the VOC Faster R-CNN R50-C4 run of §4.1 (MoCo's).

    `min_size` is the shorter image side: a tuple means one is drawn per training batch and the
    last one is used at test time (torchvision's GeneralizedRCNNTransform), so (480, …, 800)
    is the paper's "[480, 800] in the training and 800 at inference".
    """

    detector: str = "faster_rcnn_c4"
    norm: str = "sync_bn"
    min_size: int | tuple[int, ...] = _sizes(480, 800)
    max_size: int = 1333
    batch_size: int = 16
    iterations: int = 24000
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001  # detectron2's: the warm-up starts at lr × this factor
    lr_steps: tuple[float, ...] = (0.75, 11 / 12)  # × iterations: 18k and 22k of 24k
    gamma: float = 0.1
    hflip_prob: float = 0.5
    seed: int = 0
    num_workers: int = 0
    amp: bool = True  # bfloat16 autocast on CUDA only; boxes stay float32 (box_maths_in_float32)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coco(cls, detector: str = "mask_rcnn_fpn", schedule: int = 1) -> DetectionConfig:
        """The COCO runs of §4.2: 90k iterations per schedule (1× or 2×), scales [640, 800]."""
        return cls(
            detector=detector,
            min_size=_sizes(640, 800),
            iterations=90000 * schedule,
            # detectron2's Base-RetinaNet uses half the R-CNN learning rate.
            lr=0.01 if detector == "retinanet_fpn" else 0.02,
            warmup_iters=1000,
            lr_steps=(2 / 3, 8 / 9),  # 60k and 80k of 90k (120k and 160k of 180k)
        )

    @classmethod
    def cpu_friendly(
        cls, detector: str = "faster_rcnn_c4", iterations: int = 30
    ) -> DetectionConfig:
        """A few-minute CPU run on small images with reduced RoI counts (a smoke test, not AP)."""
        return cls(
            detector=detector,
            min_size=128,
            max_size=128,
            batch_size=2,
            iterations=iterations,
            lr=0.01,
            warmup_iters=min(5, iterations),
            amp=False,
            overrides=dict(_CPU_RETINANET if detector == "retinanet_fpn" else _CPU_TWO_STAGE),
        )

    def validate(self) -> DetectionConfig:
        """Raise a one-line `ConfigError` (a ValueError) naming the first bad field."""
        if self.detector not in DETECTORS:
            _fail("detector", self.detector, f"unknown (valid: {', '.join(DETECTORS)})")
        if self.norm not in NORMS:
            _fail("norm", self.norm, f"unknown (valid: {', '.join(NORMS)})")
        sizes = self.min_size if isinstance(self.min_size, tuple | list) else (self.min_size,)
        if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
            _fail("min_size", self.min_size, "needs integers >= 1")
        if not isinstance(self.max_size, int) or self.max_size < 1:
            _fail("max_size", self.max_size, "must be an integer >= 1")
        for name in ("batch_size", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "must be >= 1")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            _fail("lr", self.lr, "must be > 0")
        if not 0 <= self.momentum < 1:
            _fail("momentum", self.momentum, "must be in [0, 1)")
        if not self.weight_decay >= 0:
            _fail("weight_decay", self.weight_decay, "must be >= 0")
        if not isinstance(self.warmup_iters, int) or not 0 <= self.warmup_iters <= self.iterations:
            _fail("warmup_iters", self.warmup_iters, "must be in [0, iterations]")
        if not 0 < self.warmup_factor <= 1:
            _fail("warmup_factor", self.warmup_factor, "must be in (0, 1]")
        steps = tuple(self.lr_steps)
        if not all(0 < s < 1 for s in steps) or list(steps) != sorted(set(steps)):
            _fail("lr_steps", self.lr_steps, "needs increasing fractions of iterations in (0, 1)")
        if not 0 < self.gamma <= 1:
            _fail("gamma", self.gamma, "must be in (0, 1]")
        if not 0 <= self.hflip_prob <= 1:
            _fail("hflip_prob", self.hflip_prob, "must be in [0, 1]")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            _fail("num_workers", self.num_workers, "must be >= 0")
        if not isinstance(self.overrides, dict):
            _fail("overrides", self.overrides, "must be a mapping of constructor arguments")
        try:
            check_overrides(self.detector, self.overrides)
        except ValueError as exc:
            raise ConfigError(f"detection.{exc}") from None
        return self

    def build(
        self, arch: str, num_classes: int, backbone_state: Mapping[str, Tensor] | None = None
    ) -> nn.Module:
        """The detector these settings describe (`dupr.evaluation.detectors.build_detector`)."""
        self.validate()
        return build_detector(
            self.detector,
            arch,
            num_classes,
            backbone_state,
            norm=self.norm,
            min_size=tuple(self.min_size) if isinstance(self.min_size, list) else self.min_size,
            max_size=self.max_size,
            **self.overrides,
        )

    def lr_factor(self, iteration: int) -> float:
        """detectron2's WarmupMultiStepLR at 0-based `iteration`: linear warm-up, then steps."""
        milestones = [round(s * self.iterations) for s in self.lr_steps]
        factor = self.gamma ** bisect.bisect_right(milestones, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def _fail(name: str, value: Any, why: str) -> None:
    raise ConfigError(f"detection.{name}={value!r}: {why}")


class InfiniteSampler(Sampler[int]):
    """Endless indices, a fresh permutation per pass (detectron2's TrainingSampler), seeded;
    `start` skips that many indices of the stream (a resumed fine-tuning's consumed images)."""

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        passes, offset = divmod(self.start, self.size)
        for _ in range(passes):  # the permutations already served, drawn to advance g
            torch.randperm(self.size, generator=g)
        yield from torch.randperm(self.size, generator=g).tolist()[offset:]
        while True:
            yield from torch.randperm(self.size, generator=g).tolist()


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Images and targets as lists (detection images differ in size)."""
    return [image for image, _ in batch], [target for _, target in batch]


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Mirror an image and its boxes/masks; box x1' = W − x2, x2' = W − x1."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def _to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in target.items()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with no weight decay on norm layers (detectron2's
    WEIGHT_DECAY_NORM = 0 default)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norm_types) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def finetune(
    model: nn.Module,
    dataset: Any,
    cfg: DetectionConfig,
    device: torch.device | str,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 10,
    resume: Mapping[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every_s: float = 600.0,
) -> dict[str, float]:
    """Fine-tune `model` in place for `cfg.iterations`; return the losses averaged over the last
    logging window (each loss, their sum "loss", and the last "lr").

    Deterministic on the CPU for a given `cfg.seed`: the data order, flips, and torchvision's
    scale choice and RoI sampling (which draw from the global generator, seeded here).
    A non-finite loss stops the run with a one-line FloatingPointError naming the iteration.

    A fine-tuning takes hours at the paper's scale, so it can be checkpointed and resumed:
    `on_checkpoint` gets the whole training state (`training_state`) every
    `checkpoint_every_s` seconds and after the last iteration of a run that lasted longer, and
    `resume` (such a state) continues from its iteration as if the run had never stopped: the
    same data order, flips, random draws and logged averages (bit for bit on the CPU,
    `tests/test_detectors.py`).
    """
    cfg.validate()
    if log_every < 1:
        raise ValueError(f"log_every={log_every!r}: must be >= 1")
    if len(dataset) == 0:
        raise ValueError("finetune: the dataset has no images")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    flips = torch.Generator().manual_seed(cfg.seed + 1)
    window: list[dict[str, Tensor]] = []
    logged: dict[str, float] = {}
    first = 0
    if resume is not None:
        first = int(resume["iteration"])
        if not 0 <= first <= cfg.iterations:
            raise ValueError(
                f"finetune: resume state at iteration {first}, outside 0..{cfg.iterations}"
            )
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        flips.set_state(resume["flips"])
        window = [{k: v.to(device) for k, v in w.items()} for w in resume["window"]]
        logged = dict(resume["logged"])
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=InfiniteSampler(len(dataset), cfg.seed, start=first * cfg.batch_size),
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    amp = cfg.amp and device.type == "cuda"
    started = last_checkpoint = time.monotonic()
    batches = iter(loader)  # which draws its workers' base seed from the global generator
    if resume is not None:  # so the generators are restored after it
        torch.set_rng_state(resume["rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
    for it in range(first, cfg.iterations):
        images, targets = next(batches)
        pairs = [
            hflip(img, t) if torch.rand((), generator=flips).item() < cfg.hflip_prob else (img, t)
            for img, t in zip(images, targets, strict=True)
        ]
        images = [img.to(device, non_blocking=True) for img, _ in pairs]
        targets = [_to_device(t, device) for _, t in pairs]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise FloatingPointError(
                f"detection fine-tuning iteration {it + 1}: non-finite loss ({parts})"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        window.append({"loss": total.detach(), **{k: v.detach() for k, v in losses.items()}})
        if (it + 1) % log_every == 0 or it + 1 == cfg.iterations:
            logged = {
                k: torch.stack([w[k] for w in window]).float().mean().item() for k in window[0]
            }
            logged["lr"] = lr
            if on_log is not None:
                on_log(it + 1, logged)
            window = []
        # The last one too, if the run was long enough to be worth keeping (the evaluation
        # after it may still fail).
        now, done = time.monotonic(), it + 1 == cfg.iterations
        if on_checkpoint is not None and (
            now - last_checkpoint >= checkpoint_every_s
            or (done and now - started >= checkpoint_every_s)
        ):
            on_checkpoint(
                training_state(it + 1, model, optimizer, scheduler, flips, window, logged)
            )
            last_checkpoint = time.monotonic()
    return logged


def training_state(
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    flips: torch.Generator,
    window: list[dict[str, Tensor]],
    logged: dict[str, float],
) -> dict[str, Any]:
    """What `finetune(resume=...)` needs to continue after `iteration` iterations: weights,
    momenta, schedule, every generator the loop draws from, and the open logging window.
    The weights and momenta are the live tensors: serialise the state before training on."""
    device = next(model.parameters()).device
    return {
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "flips": flips.get_state(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "window": [{k: v.cpu() for k, v in w.items()} for w in window],
        "logged": dict(logged),
    }


def _has_masks(model: nn.Module) -> bool:
    roi_heads = getattr(getattr(model, "module", model), "roi_heads", None)
    return roi_heads is not None and roi_heads.has_mask()


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Any, device: torch.device | str, batch_size: int = 2
) -> list[dict]:
    """COCO result dicts for every image: bbox [x, y, w, h], score, category id and, for mask
    models, "segmentation" as RLE of the mask probabilities thresholded at 0.5."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    results: list[dict] = []
    try:
        for images, targets in loader:
            outputs = model([img.to(device) for img in images])
            for output, target in zip(outputs, targets, strict=True):
                results.extend(_results(output, target, dataset.category_ids))
    finally:
        model.train(was_training)
    return results


def _results(output: dict[str, Tensor], target: dict[str, Any], category_ids: list) -> list[dict]:
    image_id = int(target["image_id"])
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    rles: list[dict | None] = [None] * len(labels)
    if "masks" in output:
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = list(masks_to_rle(masks))
    results = []
    for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
        result = {
            "image_id": image_id,
            "category_id": category_ids[label - 1],
            "bbox": [round(v, 3) for v in box],
            "score": float(score),
        }
        if rle is not None:
            result["segmentation"] = rle
        results.append(result)
    return results


def evaluate(
    model: nn.Module,
    dataset: Any,
    device: torch.device | str,
    voc: bool = False,
    batch_size: int = 2,
) -> dict[str, float]:
    """COCO box AP ("bbox/AP", "bbox/AP50", ...), mask AP ("segm/...") for mask models, and
    with `voc` detectron2's VOC box AP ("voc/AP", "voc/AP50", "voc/AP75"); fractions in [0, 1],
    NaN where COCOeval has no ground truth (e.g. APs without small objects)."""
    predictions = predict(model, dataset, device, batch_size)
    iou_types = ["bbox", "segm"] if _has_masks(model) else ["bbox"]
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        for key, value in coco_metrics(dataset.coco, predictions, iou_type).items():
            metrics[f"{iou_type}/{key}"] = value
    if voc:
        for key, value in voc_metrics(dataset.coco, predictions).items():
            metrics[f"voc/{key}"] = value
    return metrics
