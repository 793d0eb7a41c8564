"""The evaluation stages' bodies (§4 of the paper), each run inside its own Ray task.

Each body reads its inputs (the backbone's weights and the data, local or on object storage),
calls the dupr/ function that does the work (`dupr.evaluation`), and writes its outputs into a
local folder; `dupr_platform.pipeline.run_stage` copies that folder into the stage's storage
folder and logs its plots and tables. The pipeline driver writes the completion marker after.

Datasets default to the bundled sets built offline (dupr.data.bundled_eval); a COCO-format
detection set or an ImageFolder classification set on a local disk or on S3, or a PASCAL VOC
devkit as distributed on a local or shared disk (`dupr.data.voc`), can replace them (see
configs/pretrain_and_eval.yaml, `eval.data`), checked before anything runs (`check_eval_data`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from dupr.backbone import ResNetBackbone
from dupr.config import LEVELS, ConfigError
from dupr.convert import infer_arch
from dupr.data.bundled_eval import bundled_classification_set, bundled_detection_set
from dupr.data.coco import CocoDetection, data_summary, load_coco, parse_json
from dupr.data.folder import is_image_file, load_rgb
from dupr.data.voc import VOC_SPLITS, VocFormatError, load_voc
from dupr.evaluation.coco_metrics import COCO_STAT_INDEX
from dupr.evaluation.correspondence import patch_correspondence_levels, plot_correspondence
from dupr.evaluation.finetune import evaluate, finetune
from dupr.evaluation.linear_probe import linear_probe, probe_transform
from dupr.evaluation.object_probe import object_probe as probe_boxes
from dupr.evaluation.spatial import iou_similarity, plot_iou_similarity
from dupr.evaluation.voc_metrics import VOC_METRICS
from dupr.photometric import normalise
from dupr_platform import tracking
from dupr_platform.configs import CLASSIFICATION_DATA, DETECTION_DATA, detection_recipe
from dupr_platform.convert_stage import CONVERT_METRICS
from dupr_platform.progress import Progress
from dupr_platform.smoke import (
    SMOKE_IMAGES,
    PeakMemory,
    StepTimer,
    flops_counted,
    profile_metrics,
)
from dupr_platform.stages import RESUME_DIR, RESUME_RUN, StageContext, StageOutput, local_input
from dupr_platform.storage import open_storage, split_uri, uri_exists
from dupr_platform.tracking import RunLogger, metric_rows, metrics_from_rows

RESUMED_TAG = "dupr.resumed_at_iteration"  # on a detection stage's run that resumed


def stage_device(ctx: StageContext) -> torch.device:
    """The stage's device: a GPU when Ray gave it one."""
    return torch.device("cuda" if ctx.gpus > 0 and torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Inputs: weights and data


def load_backbone(ctx: StageContext) -> tuple[str, dict[str, torch.Tensor] | None]:
    """(arch, torchvision state) of the stage's initialisation; state None = random init."""
    uri = ctx.inputs.get("backbone")
    if uri is None:
        return ctx.config["arch"], None
    state = torch.load(local_input(uri), map_location="cpu", weights_only=True)
    return infer_arch(state, source=uri), state


def backbone_module(ctx: StageContext) -> nn.Module:
    arch, state = load_backbone(ctx)
    torch.manual_seed(ctx.config.get("seed", 0))  # the same random init for every evaluation
    net = ResNetBackbone(arch)
    if state is not None:
        net.load_state_dict(state)  # strict: every trunk tensor, nothing else
    return net.to(stage_device(ctx)).eval()


class DetectionSplit(NamedTuple):
    """One split of the detection set as `CocoDetection` takes it."""

    images: str  # the local folder its file names are relative to
    annotations: str | dict[str, Any]  # a local COCO file, or a COCO-format dict (VOC)
    source: str  # how errors name it


# The devkit's split each pipeline split reads: the paper's 07+12 trainval and 07 test (§4.1).
VOC_SPLIT = {"train": "train", "val": "test"}


def detection_data(inputs: dict[str, str | None], split: str) -> DetectionSplit:
    """The detection set's `split` ("train" or "val"), local: a VOCdevkit read in place, the
    given COCO-format URIs (copied if on S3), or the bundled set. Every stage that reads
    detection data goes through here, so all read the same images and boxes."""
    voc_root = inputs.get("voc_root")
    if voc_root:
        root = local_input(voc_root)
        voc_split = VOC_SPLIT[split]
        sets = " + ".join(f"{y} {s}" for y, s in VOC_SPLITS[voc_split])
        return DetectionSplit(root, load_voc(root, voc_split), f"{root} ({sets})")
    if not inputs.get("train_annotations"):
        bundled = bundled_detection_set()
        bundled_json = str(bundled / "annotations" / f"instances_{split}.json")
        return DetectionSplit(str(bundled / split), bundled_json, bundled_json)
    images, annotations = inputs.get(f"{split}_images"), inputs.get(f"{split}_annotations")
    if not images or not annotations:  # validate_pipeline refuses this before any stage runs
        raise ConfigError(f"eval.data.detection: needs all of {', '.join(DETECTION_DATA)}")
    return DetectionSplit(local_input(images), local_input(annotations), annotations)


def detection_set(
    inputs: dict[str, str | None], split: str, with_masks: bool = False
) -> CocoDetection:
    """`split` of the detection set as a `CocoDetection` (see `detection_data`)."""
    data = detection_data(inputs, split)
    return CocoDetection(data.images, data.annotations, with_masks=with_masks, source=data.source)


def classification_data(inputs: dict[str, str | None]) -> dict[str, str]:
    if not inputs.get("train"):
        root = bundled_classification_set()
        return {"train": str(root / "train"), "val": str(root / "val")}
    given = {k: inputs.get(k) for k in CLASSIFICATION_DATA}
    missing = [k for k, uri in given.items() if not uri]
    if missing:  # validate_pipeline refuses this before any stage runs
        raise ConfigError(f"eval.data.classification: needs {', '.join(missing)} too")
    return {k: local_input(str(uri)) for k, uri in given.items()}


# ---------------------------------------------------------------------------------------------
# Bodies


def detection(ctx: StageContext, out: Path) -> StageOutput:
    """Fine-tune a detector from the backbone and evaluate it (Tables I–III)."""
    c = ctx.config
    cfg = detection_recipe(c, c["detector"])
    masks = cfg.detector == "mask_rcnn_fpn"
    train_set = detection_set(ctx.inputs, "train", with_masks=masks)
    val_set = detection_set(ctx.inputs, "val", with_masks=masks)
    train_set.check_files()
    # Decoded now, not only found: the evaluation reads them after the fine-tuning, which a
    # broken one would waste. A broken training image stops the fine-tuning where it is read.
    val_set.check_images(workers=max(1, int(ctx.cpus)))
    # What was trained and evaluated on, with the objects the metrics ignore (crowd, difficult).
    summary = {"train": data_summary(train_set.coco), "val": data_summary(val_set.coco)}
    (out / "data.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    device = stage_device(ctx)
    memory = None
    if ctx.profile:  # a smoke run: the whole set's classes, then a slice of it
        check_classes(train_set)
        train_set = first_images(train_set, cfg.iterations * cfg.batch_size)
        val_set = first_images(val_set, SMOKE_IMAGES // 2)
        memory = PeakMemory(device).start()
    arch, state = load_backbone(ctx)
    torch.manual_seed(cfg.seed)
    model = cfg.build(arch, train_set.num_classes, state)
    logger = RunLogger.start(ctx.tracking_uri, ctx.experiment, ctx.name, run_id=ctx.run_id)
    # Hours at the paper's scale: checkpointed to the stage's folder (key-named, so only this
    # exact fine-tuning finds it), resumed from by a rerun. Not in a smoke run.
    storage, saved = open_storage(ctx.storage_uri), f"{ctx.folder}/{RESUME_DIR}/finetune.pt"
    resume = None
    if not ctx.profile and storage.exists(saved):
        resume = torch.load(
            io.BytesIO(storage.read_bytes(saved)), map_location="cpu", weights_only=True
        )
        print(
            f"[{ctx.name}] resuming the fine-tuning after iteration {resume['iteration']} of "
            f"{cfg.iterations} ({storage.uri_for(saved)})",
            flush=True,
        )
        logger.set_tag(RESUMED_TAG, resume["iteration"])
        # What the tracking server had not taken when the state was saved (it was down).
        logger.resend(metrics_from_rows(resume.pop("unsent_metrics", [])))

    saved_run: list[str] = []

    def save(state: dict[str, Any]) -> None:
        # The losses up to this checkpoint go to MLflow now, not after hours, and before the
        # checkpoint counts, as in pre-training (dupr_platform.tracking): a run that resumes
        # from it (this one relaunched, or a rerun's) starts after them, with no gap. While
        # the tracking server cannot be reached, the state carries what it has not taken.
        logger.commit()
        if logger.sent(tracking.SEND_WAIT_S):
            logger.flush()  # raises if the server refused a batch
        else:
            state = {**state, "unsent_metrics": metric_rows(logger.unsent())}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        if not saved_run:  # first: a state always names the run that a rerun continues
            storage.write_json(f"{ctx.folder}/{RESUME_RUN}", {"run_id": ctx.run_id})
            saved_run.append(ctx.run_id)
        storage.write_bytes(saved, buffer.getvalue())  # atomic: the old state or the new

    progress = Progress(ctx.name, cfg.iterations, unit="iter")
    timer = StepTimer()

    def on_log(iteration: int, losses: dict[str, float]) -> None:
        timer.tick()
        logger.log_metrics(iteration, {f"train/{k}": v for k, v in losses.items()})
        progress.update(iteration, {"loss": losses.get("loss", float("nan"))})

    with flops_counted(device if memory else None) as flops:
        finetune(
            model,
            train_set,
            cfg,
            device,
            on_log=on_log,
            log_every=c.get("log_every", 10),
            resume=resume,
            on_checkpoint=None if ctx.profile else save,
            checkpoint_every_s=60.0 * c["checkpoint_minutes"],
        )
    measured = {}
    if memory is not None:
        measured = profile_metrics(
            device,
            cfg.batch_size,
            memory.stop(),
            timer.step_s(),
            flops.get("total"),
            cfg.iterations,
        )
    metrics = evaluate(model, val_set, device, voc=c.get("voc_metric", True)) | measured
    logger.commit()
    # The driver ends the run once this returns: every iteration must be in MLflow by then.
    # (After a failure nothing needs sending: what the last checkpoint counts was sent or is
    # carried by it, and a resume trains the later iterations again.)
    logger.flush()  # waits for a tracking server that cannot be reached (tracking.PATIENCE_S)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return StageOutput(
        files={"metrics": "metrics.json", "data": "data.json"},
        metrics=metrics,
        artifacts=["data.json"],
    )


def check_classes(data: CocoDetection) -> None:
    """Every class of the detection set has a training box (a smoke run's check: a class
    without one cannot be learnt, and its AP is 0 or undefined)."""
    boxes = {a["category_id"] for a in data.coco["annotations"] if not a.get("iscrowd")}
    missing = [c["name"] for c in data.coco["categories"] if c["id"] not in boxes]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(
            f"eval.data.detection: {data.source}: {len(missing)} of "
            f"{len(data.coco['categories'])} classes have no training box ({shown})"
        )


def first_images(data: CocoDetection, n: int) -> CocoDetection:
    """The set's first `n` images (annotation order) with their annotations only, so that
    metrics on the slice count only its ground truth."""
    images = data.coco["images"][:n]
    ids = {im["id"] for im in images}
    coco = {
        **data.coco,
        "images": images,
        "annotations": [a for a in data.coco["annotations"] if a["image_id"] in ids],
    }
    return CocoDetection(data.image_root, coco, with_masks=data.with_masks, source=data.source)


SPATIAL_METRICS = ("slope", "sim_iou_above_0.5", "sim_iou_below_0.3", "points")
CORRESPONDENCE_METRICS = ("accuracy", "valid_cells")  # on the configured `level`, within one
# Issue 15: conv4 and conv5 always, each as "<level>/<score>".
CORRESPONDENCE_LEVELS = (2, 3)
# Each beside a content-blind baseline on the same view pairs: every cell matched to the cell
# at the same grid position (a backbone that scores no more follows position, not content).
CORRESPONDENCE_SCORES = ("exact", "within_one", "same_position_exact", "same_position_within_one")


def correspondence_levels(config: dict[str, Any]) -> list[int]:
    """The levels a correspondence stage evaluates: `levels` if set, else conv4, conv5 and the
    configured `level` (whose within-one accuracy stays the stage's `accuracy`)."""
    return sorted({config["level"], *(config.get("levels") or CORRESPONDENCE_LEVELS)})


def metric_names(kind: str, config: dict[str, Any]) -> list[str]:
    """The metrics a stage of `kind` with this config slice reports (what its body returns)."""
    if kind == "detection":
        iou_types = ["bbox", "segm"] if config["detector"] == "mask_rcnn_fpn" else ["bbox"]
        names = [f"{t}/{k}" for t in iou_types for k in COCO_STAT_INDEX]
        return names + ([f"voc/{k}" for k in VOC_METRICS] if config.get("voc_metric") else [])
    if kind == "correspondence":
        levels = correspondence_levels(config)
        scores = [f"{LEVELS[m]}/{k}" for m in levels for k in CORRESPONDENCE_SCORES]
        return list(CORRESPONDENCE_METRICS) + scores
    return {
        "spatial": list(SPATIAL_METRICS),
        "probe": list(LEVELS),
        "object_probe": list(LEVELS),
        "convert": list(CONVERT_METRICS),
    }.get(kind, [])


def spatial(ctx: StageContext, out: Path) -> StageOutput:
    """The IoU–similarity curve of §4.6.1 (Eq. 9) on the detection set's validation boxes."""
    c = ctx.config
    val_set = detection_set(ctx.inputs, "val")
    images, boxes = [], []
    for i in range(min(len(val_set), c["max_images"])):
        image, target = val_set[i]
        if len(target["boxes"]):
            images.append(normalise(image))
            boxes.append(target["boxes"])
    result = iou_similarity(
        backbone_module(ctx),
        images,
        boxes,
        level=c["level"],
        roi_size=c["roi_size"],
        rois_per_box=c["rois_per_box"],
        bins=c["bins"],
        seed=c.get("seed", 0),
    )
    init = c["init"]
    plot_iou_similarity({init: result}, out / "iou_similarity.png")
    _write_rows(out / "iou_similarity.csv", result.as_rows())
    (out / "points.json").write_text(
        json.dumps({"ious": result.ious.tolist(), "sims": result.sims.tolist(), "bins": c["bins"]})
    )
    # The paper reads Fig. 6 at these IoUs: above 0.5 (positives), below 0.3 (negatives).
    values = (
        float(result.slope),
        _mean(result.sims[result.ious > 0.5]),
        _mean(result.sims[result.ious < 0.3]),
        float(len(result.ious)),
    )
    metrics = dict(zip(SPATIAL_METRICS, values, strict=True))
    return StageOutput(
        files={"points": "points.json", "plot": "iou_similarity.png"},
        metrics=metrics,
        artifacts=["iou_similarity.png", "iou_similarity.csv"],
    )


def correspondence(ctx: StageContext, out: Path) -> StageOutput:
    """Patch matching between two augmented views (§4.6.2, Fig. 7)."""
    c = ctx.config
    # The images the annotation file names, in its order: never a folder listing, which would
    # mix splits (VOC's JPEGImages/), miss sub-folders and trip over other files.
    val_set = detection_set(ctx.inputs, "val")
    images = [load_rgb(val_set.image_path(i)) for i in range(min(len(val_set), c["max_images"]))]
    by_level = patch_correspondence_levels(
        backbone_module(ctx),
        images,
        image_size=c["image_size"],
        levels=correspondence_levels(c),
        pairs_per_image=c["pairs_per_image"],
        seed=c.get("seed", 0),
    )
    result = by_level[LEVELS[c["level"]]]
    plot_correspondence(result, out / "correspondence.png")
    values = (float(result.accuracy), float(result.num_valid))
    metrics = dict(zip(CORRESPONDENCE_METRICS, values, strict=True))
    for level, r in by_level.items():
        metrics |= {f"{level}/{k}": float(getattr(r, k)) for k in CORRESPONDENCE_SCORES}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return StageOutput(
        files={"plot": "correspondence.png", "metrics": "metrics.json"},
        metrics=metrics,
        artifacts=["correspondence.png"],
    )


def probe(ctx: StageContext, out: Path) -> StageOutput:
    """Per-level linear probe on frozen pooled features (Table VI b)."""
    from torchvision.datasets import ImageFolder

    c = ctx.config
    data = classification_data(ctx.inputs)
    transform = probe_transform(c["image_size"])
    train, val = (ImageFolder(data[split], transform=transform) for split in ("train", "val"))
    accuracy = linear_probe(
        backbone_module(ctx),
        spread(train, c.get("max_images")),
        spread(val, c.get("max_images")),
        batch_size=c["batch_size"],
        device=stage_device(ctx),
    )
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    return StageOutput(files={"accuracy": "accuracy.json"}, metrics=accuracy)


def spread(data: Any, n: int | None) -> Any:
    """`n` items spread evenly over a class-sorted set (ImageFolder), so every class keeps
    some; the whole set when `n` is None or not smaller."""
    if n is None or n >= len(data):
        return data
    return Subset(data, sorted({int(i) for i in np.linspace(0, len(data) - 1, n)}))


def object_probe(ctx: StageContext, out: Path) -> StageOutput:
    """Per-level linear probe on frozen RoI features of the detection set's ground-truth boxes
    (train boxes → val boxes): the cheapest detection-relevant comparison of backbones."""
    c = ctx.config
    train, val = (detection_set(ctx.inputs, split) for split in ("train", "val"))
    first = {
        split: range(min(len(d), c["max_images"])) for split, d in (("train", train), ("val", val))
    }
    accuracy = probe_boxes(
        backbone_module(ctx),
        Subset(train, first["train"]),  # the same items, the first max_images
        Subset(val, first["val"]),
        roi_size=c["roi_size"],
        image_size=c["image_size"],
        C=c["C"],
        seed=c.get("seed", 0),
    )
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    return StageOutput(files={"accuracy": "accuracy.json"}, metrics=accuracy)


# ---------------------------------------------------------------------------------------------
# Checks before anything runs


def check_eval_data(data: dict[str, Any]) -> None:
    """The evaluation sets given in `eval.data` can be read: annotation files parse as COCO
    (a JSON error names the file, line and column), every image they name is in its image
    folder, a VOCdevkit has the layout, image sets, XMLs and JPEGs the protocol reads, and the
    classification roots have class folders. The bundled sets need nothing. Single images
    that do not decode are found at run time (the stages that read them fail; the rest of
    the pipeline goes on)."""
    det = data.get("detection") or {}
    if det.get("voc_root"):
        _check_voc(det["voc_root"])
    for split in ("train", "val"):
        images, annotations = det.get(f"{split}_images"), det.get(f"{split}_annotations")
        if not annotations:
            continue
        where = f"eval.data.detection.{split}_annotations"
        if not uri_exists(annotations):
            raise ConfigError(f"{where}: {annotations!r} does not exist")
        storage, name = split_uri(annotations)
        coco = load_coco(parse_json(storage.read_bytes(name), annotations), source=annotations)
        if not images:  # validate_pipeline refuses this first
            raise ConfigError(f"eval.data.detection.{split}_images: not set, {where} is")
        _check_image_files(coco, images, annotations, f"eval.data.detection.{split}_images")
    cls = data.get("classification") or {}
    for split in ("train", "val"):
        root = cls.get(split)
        if root:
            _check_class_folders(root, f"eval.data.classification.{split}")


def _check_voc(root: str) -> None:
    """Both splits of the devkit load as the stages will load them (`load_voc`)."""
    where = "eval.data.detection.voc_root"
    if not os.path.isdir(root):
        raise ConfigError(f"{where}: {root!r} does not exist or is not a folder")
    for split in VOC_SPLIT.values():
        try:
            load_voc(root, split)
        except VocFormatError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _check_image_files(coco: dict[str, Any], images: str, source: str, where: str) -> None:
    if not uri_exists(images):
        raise ConfigError(f"{where}: {images!r} does not exist")
    storage = open_storage(images)
    present = set(storage.list(recursive=True))
    missing = [im for im in coco["images"] if im["file_name"] not in present]
    if missing:
        first = missing[0]
        raise ConfigError(
            f"{where}: {source} names {len(missing)} image(s) that are not in {images!r}, "
            f"e.g. {first['file_name']!r} (id {first['id']})"
        )


def _check_class_folders(root: str, where: str) -> None:
    if not uri_exists(root):
        raise ConfigError(f"{where}: {root!r} does not exist")
    entries = open_storage(root).list(recursive=True)
    classes = {e.split("/")[0] for e in entries if "/" in e and is_image_file(e)}
    if len(classes) < 2:
        raise ConfigError(
            f"{where}: {root!r} needs one sub-folder of images per class (found {len(classes)})"
        )


def absolute_data(ev: dict[str, Any]) -> dict[str, Any]:
    ev = json.loads(json.dumps(ev))
    for section in ("detection", "classification"):
        given = ev["data"].get(section) or {}
        for key, value in given.items():
            if isinstance(value, str) and "://" not in value:
                given[key] = os.path.abspath(value)
    return ev


# ---------------------------------------------------------------------------------------------
# The study's results, side by side


def _write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
