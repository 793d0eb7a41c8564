"""Stage bodies for conversion and the downstream evaluations, run inside Ray tasks.

Each body reads its inputs (weights and data, local or on object storage), calls the dupr/
function that does the work, and writes its outputs into a local folder. `run_stage` then
copies that folder into the stage's storage folder and logs the plots and tables to the
stage's MLflow run. The pipeline driver writes the completion marker only after that.

Datasets default to the bundled sets built offline (dupr.data.bundled_eval); a COCO-format
detection set or an ImageFolder classification set on a local disk or on S3 can replace them
(see configs/pretrain_and_eval.yaml, `eval.data`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dupr.backbone import ResNetBackbone
from dupr.config import LEVELS, ConfigError
from dupr.convert import (
    SETTINGS,
    ConversionError,
    backbone_from_checkpoint,
    detectron2_config,
    infer_arch,
    save_detectron2,
    to_detectron2,
)
from dupr.data.bundled import default_data_home
from dupr.data.bundled_eval import bundled_classification_set, bundled_detection_set
from dupr.data.coco import CocoDetection, load_coco, parse_json
from dupr.data.folder import is_image_file, load_rgb
from dupr.evaluation.coco_metrics import COCO_STAT_INDEX
from dupr.evaluation.correspondence import patch_correspondence, plot_correspondence
from dupr.evaluation.detectors import build_detector
from dupr.evaluation.finetune import evaluate, finetune
from dupr.evaluation.linear_probe import linear_probe, probe_transform
from dupr.evaluation.spatial import SpatialResult, iou_similarity, plot_iou_similarity, summarise
from dupr.evaluation.voc_metrics import VOC_METRICS
from dupr.views import IMAGENET_MEAN, IMAGENET_STD
from dupr_platform.configs import CLASSIFICATION_DATA, DETECTION_DATA, detection_recipe
from dupr_platform.progress import Progress
from dupr_platform.ray_pretrain import STATE_FILE
from dupr_platform.stages import Stage, StageContext, StageOutput
from dupr_platform.storage import localize, open_storage, split_uri
from dupr_platform.tracking import RunLogger


def _cache_dir() -> Path:
    path = default_data_home() / "remote"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _device(ctx: StageContext) -> torch.device:
    return torch.device("cuda" if ctx.gpus > 0 and torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Inputs: weights and data


def load_checkpoint_file(uri: str) -> dict[str, Any]:
    """A checkpoint's state: a pre-training checkpoint folder (state.pt) or a .pth/.pt file."""
    path = Path(localize(uri, _cache_dir()))
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint {uri!r}: no {STATE_FILE} in the folder and not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"checkpoint {uri!r}: not a PyTorch checkpoint ({exc})") from None


def load_backbone(ctx: StageContext) -> tuple[str, dict[str, torch.Tensor] | None]:
    """(arch, torchvision state) of the stage's initialisation; state None = random init."""
    uri = ctx.inputs.get("backbone")
    if uri is None:
        return ctx.config["arch"], None
    state = torch.load(localize(uri, _cache_dir()), map_location="cpu", weights_only=True)
    return infer_arch(state, source=uri), state


def backbone_module(ctx: StageContext) -> nn.Module:
    arch, state = load_backbone(ctx)
    torch.manual_seed(ctx.config.get("seed", 0))  # the same random init for every evaluation
    net = ResNetBackbone(arch)
    if state is not None:
        net.load_state_dict(state)  # strict: every trunk tensor, nothing else
    return net.to(_device(ctx)).eval()


def detection_data(inputs: dict[str, str | None]) -> dict[str, str]:
    """Local paths of the detection set: the given URIs, or the bundled set."""
    if not inputs.get("train_annotations"):
        root = bundled_detection_set()
        return {
            "train_images": str(root / "train"),
            "train_annotations": str(root / "annotations" / "instances_train.json"),
            "val_images": str(root / "val"),
            "val_annotations": str(root / "annotations" / "instances_val.json"),
        }
    return {k: localize(inputs[k], _cache_dir()) for k in DETECTION_DATA}


def classification_data(inputs: dict[str, str | None]) -> dict[str, str]:
    if not inputs.get("train"):
        root = bundled_classification_set()
        return {"train": str(root / "train"), "val": str(root / "val")}
    return {k: localize(inputs[k], _cache_dir()) for k in CLASSIFICATION_DATA}


def _normalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


# ---------------------------------------------------------------------------------------------
# Bodies


def convert(ctx: StageContext, out: Path) -> StageOutput:
    """Checkpoint → torchvision state_dict, detectron2 .pkl and the detectron2 config lines."""
    uri = ctx.inputs["checkpoint"]
    arch, state = backbone_from_checkpoint(load_checkpoint_file(uri), source=uri)
    torch.save(state, out / "backbone_torchvision.pth")
    d2_path = save_detectron2(to_detectron2(state), out / "backbone_detectron2.pkl")
    d2_uri = open_storage(ctx.storage_uri).uri_for(ctx.folder, d2_path.name)
    files = {"torchvision": "backbone_torchvision.pth", "detectron2": d2_path.name}
    for setting in SETTINGS:
        try:
            text = detectron2_config(arch, setting, weights=d2_uri)
        except ConversionError:
            continue  # e.g. detectron2's C4 head builds bottleneck blocks only: no R18/R34
        name = f"detectron2_{setting}.yaml"
        (out / name).write_text(text)
        files[f"detectron2_config_{setting}"] = name
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith("running_mean"))
    return StageOutput(
        files=files,
        metrics={"parameters": float(parameters), "tensors": float(len(state))},
        values={"arch": arch},
        artifacts=[f for k, f in files.items() if k.startswith("detectron2_config")],
    )


def detection(ctx: StageContext, out: Path) -> StageOutput:
    """Fine-tune a detector from the backbone and evaluate it (Tables I–III)."""
    c = ctx.config
    cfg = detection_recipe(c, c["detector"])
    data = detection_data(ctx.inputs)
    masks = cfg.detector == "mask_rcnn_fpn"
    train_set = CocoDetection(data["train_images"], data["train_annotations"], with_masks=masks)
    val_set = CocoDetection(data["val_images"], data["val_annotations"], with_masks=masks)
    train_set.check_files()
    val_set.check_files()
    arch, state = load_backbone(ctx)
    torch.manual_seed(cfg.seed)
    model = build_detector(
        cfg.detector,
        arch,
        train_set.num_classes,
        state,
        norm=cfg.norm,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        **cfg.overrides,
    )
    device = _device(ctx)
    logger = RunLogger.start(ctx.tracking_uri, ctx.experiment, ctx.name, run_id=ctx.run_id)
    progress = Progress(ctx.name, cfg.iterations, unit="iter")

    def on_log(iteration: int, losses: dict[str, float]) -> None:
        logger.log_metrics(iteration, {f"train/{k}": v for k, v in losses.items()})
        progress.update(iteration, {"loss": losses.get("loss", float("nan"))})

    try:
        finetune(model, train_set, cfg, device, on_log=on_log, log_every=c.get("log_every", 10))
        metrics = evaluate(model, val_set, device, voc=c.get("voc_metric", True))
        logger.commit()
    finally:
        logger.flush()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return StageOutput(files={"metrics": "metrics.json"}, metrics=metrics)


SPATIAL_METRICS = ("slope", "sim_iou_above_0.5", "sim_iou_below_0.3", "points")
CORRESPONDENCE_METRICS = ("accuracy", "valid_cells")


def metric_names(kind: str, config: dict[str, Any]) -> list[str]:
    """The metrics a stage of `kind` with this config slice reports (what its body returns)."""
    if kind == "detection":
        iou_types = ["bbox", "segm"] if config["detector"] == "mask_rcnn_fpn" else ["bbox"]
        names = [f"{t}/{k}" for t in iou_types for k in COCO_STAT_INDEX]
        return names + ([f"voc/{k}" for k in VOC_METRICS] if config.get("voc_metric") else [])
    return {
        "spatial": list(SPATIAL_METRICS),
        "correspondence": list(CORRESPONDENCE_METRICS),
        "probe": list(LEVELS),
        "convert": ["parameters", "tensors"],
    }.get(kind, [])


def spatial(ctx: StageContext, out: Path) -> StageOutput:
    """The IoU–similarity curve of §4.6.1 (Eq. 9) on the detection set's validation boxes."""
    c = ctx.config
    data = detection_data(ctx.inputs)
    val_set = CocoDetection(data["val_images"], data["val_annotations"])
    images, boxes = [], []
    for i in range(min(len(val_set), c["max_images"])):
        image, target = val_set[i]
        if len(target["boxes"]):
            images.append(_normalise(image))
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
    data = detection_data(ctx.inputs)
    files = sorted(p for p in Path(data["val_images"]).iterdir() if p.is_file())
    images = [load_rgb(p) for p in files[: c["max_images"]]]
    result = patch_correspondence(
        backbone_module(ctx),
        images,
        image_size=c["image_size"],
        level=c["level"],
        pairs_per_image=c["pairs_per_image"],
        seed=c.get("seed", 0),
    )
    plot_correspondence(result, out / "correspondence.png")
    values = (float(result.accuracy), float(result.num_valid))
    metrics = dict(zip(CORRESPONDENCE_METRICS, values, strict=True))
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
    accuracy = linear_probe(
        backbone_module(ctx),
        ImageFolder(data["train"], transform=transform),
        ImageFolder(data["val"], transform=transform),
        batch_size=c["batch_size"],
        device=_device(ctx),
    )
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    return StageOutput(files={"accuracy": "accuracy.json"}, metrics=accuracy)


BODIES: dict[str, Callable[[StageContext, Path], StageOutput]] = {
    "convert": convert,
    "detection": detection,
    "spatial": spatial,
    "correspondence": correspondence,
    "probe": probe,
}


def run_stage(ctx: StageContext) -> StageOutput:
    """Run the body, copy its folder to the stage's storage folder, log its artifacts."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="dupr-stage-") as tmp:
        result = BODIES[ctx.kind](ctx, Path(tmp))
        open_storage(ctx.storage_uri).upload(tmp, ctx.folder)
        client = MlflowClient(ctx.tracking_uri)
        # 0 unless Ray's low worker priority applied (see cluster.COMPUTE_PRIORITY).
        client.set_tag(ctx.run_id, "dupr.worker_niceness", str(os.nice(0)))
        for name in result.artifacts:
            client.log_artifact(ctx.run_id, os.path.join(tmp, name))
    return result


# ---------------------------------------------------------------------------------------------
# Checks before anything runs


def _exists(uri: str) -> bool:
    if "://" not in uri:
        return os.path.exists(uri)
    storage, name = split_uri(uri)
    return storage.exists(name)


def check_inputs(kind: str, inputs: dict[str, Any]) -> None:
    """A stage's literal checkpoint input exists and holds a ResNet backbone (data is checked
    once for all stages by `check_eval_data`)."""
    uri = inputs.get("checkpoint")
    if kind != "convert" or not isinstance(uri, str):
        return  # a Ref to another stage's output, or no checkpoint
    if not _exists(uri):
        raise ConfigError(f"{kind} input checkpoint: {uri!r} does not exist")
    # A baseline checkpoint: refuse it now, not after pre-training.
    backbone_from_checkpoint(load_checkpoint_file(uri), source=uri)


def check_eval_data(data: dict[str, Any]) -> None:
    """The evaluation sets given in `eval.data` can be read: annotation files parse as COCO
    (a JSON error names the file, line and column), every image they name is in its image
    folder, and the classification roots have class folders. The bundled sets need nothing.
    Single images that do not decode are found at run time (the stages that read them fail;
    the rest of the pipeline goes on)."""
    det = data.get("detection") or {}
    for split in ("train", "val"):
        images, annotations = det.get(f"{split}_images"), det.get(f"{split}_annotations")
        if not annotations:
            continue
        where = f"eval.data.detection.{split}_annotations"
        if not _exists(annotations):
            raise ConfigError(f"{where}: {annotations!r} does not exist")
        storage, name = split_uri(annotations)
        coco = load_coco(parse_json(storage.read_bytes(name), annotations), source=annotations)
        _check_image_files(coco, images, annotations, f"eval.data.detection.{split}_images")
    cls = data.get("classification") or {}
    for split in ("train", "val"):
        root = cls.get(split)
        if root:
            _check_class_folders(root, f"eval.data.classification.{split}")


def _check_image_files(coco: dict[str, Any], images: str, source: str, where: str) -> None:
    if not _exists(images):
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
    if not _exists(root):
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


def results_by_init(
    stages: list[Stage], records: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """{init: {"<kind>[/<detector>]/<metric>": value}} over the finished evaluation stages."""
    rows: dict[str, dict[str, float]] = {}
    for stage in stages:
        record = records.get(stage.name)
        if record is None or stage.kind in ("pretrain", "convert"):
            continue
        parts = stage.name.split("/")
        init, prefix = parts[-1], "/".join(parts[1:-1])
        row = rows.setdefault(init, {})
        for key, value in record["metrics"].items():
            row[f"{stage.kind}{'/' + prefix if prefix else ''}/{key}"] = value
    return rows


def report(
    cfg: dict[str, Any], stages: list[Stage], records: dict[str, dict[str, Any]], parent: RunLogger
) -> None:
    """Results per initialisation (rows) and metric (columns), and the Fig. 6 curves overlaid.

    Logged to the parent run as results.md, results.csv, an MLflow table and, when spatial
    stages finished, iou_similarity.png with one curve per initialisation.
    """
    rows = results_by_init(stages, records)
    curves: dict[str, SpatialResult] = {}
    storage = open_storage(cfg["storage"])
    for stage in stages:
        record = records.get(stage.name)
        init = stage.name.split("/")[-1]
        if record is not None and stage.kind == "spatial":
            _, name = split_uri(record["outputs"]["points"])
            points = json.loads(storage.read_bytes(f"{stage.folder}/{name}"))
            curves[init] = summarise(
                np.array(points["ious"]), np.array(points["sims"]), points["bins"]
            )
    if not rows:
        return
    columns = sorted({k for r in rows.values() for k in r})
    table = [{"init": init, **{c: rows[init].get(c) for c in columns}} for init in rows]
    parent.log_text(_markdown(table, ["init", *columns]), "results.md")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["init", *columns])
    writer.writeheader()
    writer.writerows(table)
    parent.log_text(buffer.getvalue(), "results.csv")
    for init, row in rows.items():
        parent.log_metrics(0, {f"{init}/{k}": v for k, v in row.items()})
    parent.commit()
    if curves:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "iou_similarity.png"
            plot_iou_similarity(curves, path)
            parent.log_artifact(path)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
