"""The pipeline's configuration, stage graph, cache keys and preflight: no cluster needed."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from dupr.config import PRESETS, ConfigError, preset
from dupr.convert import ConversionError
from dupr.data.coco import CocoFormatError
from dupr.evaluation.finetune import DetectionConfig
from dupr_platform.configs import compose, detection_recipe
from dupr_platform.convert_stage import convert
from dupr_platform.eval_stages import metric_names
from dupr_platform.pipeline import BODIES, build_stages, run_pipeline
from dupr_platform.progress import Progress
from dupr_platform.stages import Ref, Stage, assign_keys
from helpers import stage_context

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def config(tmp_path: Path, *overrides: str) -> dict:
    return compose(
        CONFIGS,
        "pretrain_and_eval",
        [
            f"storage={tmp_path / 'storage'}",
            f"tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            *overrides,
        ],
    )


@pytest.mark.parametrize("name", PRESETS)
def test_the_method_group_is_the_python_presets(tmp_path, name):
    """`method=NAME` selects dupr.config.preset(NAME), stored once in Hydra's ConfigStore."""
    as_lists = json.loads(json.dumps(preset(name).to_dict()))
    assert config(tmp_path, f"method={name}")["pretrain"]["method"] == as_lists
    assert not (CONFIGS / "method").exists()  # no second copy of the presets


def test_presets_select_the_method_and_overrides_reach_it(tmp_path):
    cfg = config(tmp_path, "preset=mocov2", "pretrain.method.model.tau=0.3")
    assert cfg["pretrain"]["label"] == "mocov2"
    assert cfg["pretrain"]["method"]["model"]["alpha"] == [0.0, 0.0, 0.0, 1.0]
    assert cfg["pretrain"]["method"]["model"]["tau"] == 0.3
    assert [s.name for s in build_stages(cfg)][:3] == [
        "pretrain",
        "convert/mocov2",
        "spatial/mocov2",
    ]


def test_paper_preset_takes_its_data_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DUPR_IMAGENET_SHARDS", "s3://datasets/imagenet-shards")
    monkeypatch.setenv("DUPR_VOC_ROOT", "/shared/VOCdevkit")
    cfg = config(tmp_path, "preset=paper_r50_imagenet")
    assert cfg["pretrain"]["method"]["model"]["backbone"] == "resnet50"
    assert cfg["pretrain"]["method"]["optim"]["epochs"] == 200
    assert cfg["pretrain"]["num_workers"] == 8 and cfg["pretrain"]["use_gpu"] is True
    assert cfg["pretrain"]["data"] == "s3://datasets/imagenet-shards"
    assert cfg["eval"]["detection"]["detectors"] == ["faster_rcnn_c4"]
    # The VOCdevkit as distributed, read in place (dupr.data.voc): no conversion step.
    assert cfg["eval"]["data"]["detection"] == {
        "voc_root": "/shared/VOCdevkit",
        **dict.fromkeys(("train_images", "train_annotations", "val_images", "val_annotations")),
    }
    monkeypatch.delenv("DUPR_IMAGENET_SHARDS")
    with pytest.raises(ConfigError, match="DUPR_IMAGENET_SHARDS"):
        config(tmp_path, "preset=paper_r50_imagenet")


def test_paper_coco_preset_is_the_1x_mask_rcnn_recipe_on_coco_2017(tmp_path, monkeypatch):
    """§4.2: Mask R-CNN R50-FPN, SyncBN, 1x (DetectionConfig.coco), box and mask AP, on COCO
    2017 as distributed under DUPR_COCO_ROOT; the same pre-training as paper_r50_imagenet."""
    monkeypatch.setenv("DUPR_IMAGENET_SHARDS", "s3://datasets/imagenet-shards")
    monkeypatch.setenv("DUPR_COCO_ROOT", "s3://datasets/coco")
    monkeypatch.delenv("DUPR_VOC_ROOT", raising=False)  # not needed by the COCO study
    cfg = config(tmp_path, "preset=paper_r50_coco")
    assert cfg["eval"]["data"]["detection"] == {
        "voc_root": None,
        "train_images": "s3://datasets/coco/train2017",
        "train_annotations": "s3://datasets/coco/annotations/instances_train2017.json",
        "val_images": "s3://datasets/coco/val2017",
        "val_annotations": "s3://datasets/coco/annotations/instances_val2017.json",
    }
    det = cfg["eval"]["detection"]
    assert det["detectors"] == ["mask_rcnn_fpn"] and det["voc_metric"] is False
    paper = dataclasses.asdict(DetectionConfig.coco("mask_rcnn_fpn", 1))
    recipe = dataclasses.asdict(detection_recipe(det, "mask_rcnn_fpn"))
    # overrides: see test_paper_presets_use_the_detectors_own_roi_counts.
    assert _without(recipe, "overrides") == _without(paper, "overrides")
    assert recipe["norm"] == "sync_bn" and recipe["iterations"] == 90000
    stages = {s.name: s for s in build_stages(cfg)}
    assert stages["detection/mask_rcnn_fpn/dupr"].config["detector"] == "mask_rcnn_fpn"
    assert set(metric_names("detection", stages["detection/mask_rcnn_fpn/dupr"].config)) == {
        f"{t}/{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }
    # One pre-trained model for both studies: the pre-training stage has the same key.
    monkeypatch.setenv("DUPR_VOC_ROOT", "/shared/VOCdevkit")
    voc = {s.name: s for s in build_stages(config(tmp_path, "preset=paper_r50_imagenet"))}
    assert stages["pretrain"].key == voc["pretrain"].key
    monkeypatch.delenv("DUPR_COCO_ROOT")
    with pytest.raises(ConfigError, match="DUPR_COCO_ROOT"):
        config(tmp_path, "preset=paper_r50_coco")


@pytest.mark.parametrize("name", ["paper_r50_imagenet", "paper_r50_coco"])
def test_paper_presets_use_the_detectors_own_roi_counts(tmp_path, monkeypatch, name):
    """A preset replaces the demo's recipe: its `overrides: {}` is not merged with the CPU's."""
    for var in ("DUPR_IMAGENET_SHARDS", "DUPR_VOC_ROOT", "DUPR_COCO_ROOT"):
        monkeypatch.setenv(var, "/data")
    assert config(tmp_path, f"preset={name}")["eval"]["detection"]["overrides"] == {}


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_coco_2017_layout_with_sub_folders_and_other_files_passes_preflight(tmp_path, monkeypatch):
    """COCO as distributed (train2017/, val2017/, annotations/instances_*2017.json), whose
    file names may hold a sub-folder and whose image folders may hold other files: preflight
    and CocoDetection go by the file names, never by a folder listing."""
    from dupr.data.bundled_eval import bundled_detection_set
    from dupr.data.coco import CocoDetection
    from dupr_platform.eval_stages import check_eval_data, detection_set

    source, root = bundled_detection_set(), tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        images = root / f"{split}2017"
        shutil.copytree(source / split, images)
        coco = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        first = coco["images"][0]["file_name"]
        (images / "part1").mkdir()
        (images / first).rename(images / "part1" / first)
        coco["images"][0]["file_name"] = f"part1/{first}"
        (images / "index.json").write_text("{}")  # other files next to the images
        shutil.copy(images / coco["images"][1]["file_name"], images / "preview.jpg")
        (images / "README").write_text("not an image")
        annotations = root / "annotations" / f"instances_{split}2017.json"
        annotations.write_text(json.dumps(coco))
    monkeypatch.setenv("DUPR_IMAGENET_SHARDS", "/data/shards")
    monkeypatch.setenv("DUPR_COCO_ROOT", str(root))
    data = config(tmp_path, "preset=paper_r50_coco")["eval"]["data"]
    check_eval_data(data)
    val = detection_set(data["detection"], "val", with_masks=True)
    assert isinstance(val, CocoDetection) and len(val) == len(coco["images"])
    val.check_files()
    image, target = val[0]  # the one in the sub-folder, with its masks
    assert image.shape[0] == 3 and target["masks"].shape[0] == len(target["boxes"])

    (root / "val2017" / "part1" / first).unlink()
    with pytest.raises(ConfigError) as info:
        check_eval_data(data)
    assert str(info.value).startswith("eval.data.detection.val_images: ")
    assert f"'part1/{first}'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, match",
    [
        ("preset=nope", "preset='nope': unknown \\(valid: cpu_demo, mocov2, paper_r50_coco, paper"),
        ("method=nope", "method='nope': unknown"),
        ("eval.detection.nope=1", "eval.detection.nope"),
        ("stages=[pretrain", "no viable alternative"),
    ],
)
def test_bad_overrides_are_one_line_errors(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match) as info:
        config(tmp_path, override)
    assert "\n" not in str(info.value)


def test_keys_change_exactly_where_the_inputs_change(tmp_path):
    base = {s.name: s.key for s in build_stages(config(tmp_path))}
    tau = {s.name: s.key for s in build_stages(config(tmp_path, "pretrain.method.model.tau=0.3"))}
    # τ is DUPR's: the MoCo v2 baseline keeps MoCo v2's, and random initialisation has none.
    unchanged = {n for n in base if n.endswith(("/random", "/mocov2"))}
    assert all(base[n] != tau[n] for n in base if n not in unchanged)
    assert all(base[n] == tau[n] for n in unchanged)
    lr = {s.name: s.key for s in build_stages(config(tmp_path, "pretrain.method.optim.lr=0.02"))}
    assert {n for n in base if base[n] == lr[n]} == {n for n in base if n.endswith("/random")}

    det = {s.name: s.key for s in build_stages(config(tmp_path, "eval.detection.iterations=7"))}
    assert {n for n in base if base[n] != det[n]} == {
        "detection/faster_rcnn_fpn/dupr",
        "detection/faster_rcnn_fpn/mocov2",
        "detection/faster_rcnn_fpn/random",
    }
    # How a run executes (retries, logging, CPUs per worker) does not change what it produces.
    same = build_stages(
        config(
            tmp_path,
            "pretrain.max_failures=9",
            "pretrain.log_every=3",
            "pretrain.worker_group_start_minutes=15",
            "eval.detection.checkpoint_minutes=1",
            "eval.detection.log_every=1",
            "eval.max_failures=0",
            "eval.node_wait_minutes=1",
        )
    )
    assert {s.name: s.key for s in same} == base


def test_stage_keys_follow_references_and_reject_unknown_ones():
    a = Stage("a", "convert", {"x": 1})
    b = Stage("b", "probe", {}, {"w": Ref("a", "out")})
    assign_keys([a, b])
    key_b = b.key
    a2, b2 = Stage("a", "convert", {"x": 2}), Stage("b", "probe", {}, {"w": Ref("a", "out")})
    assign_keys([a2, b2])
    assert b2.key != key_b
    with pytest.raises(ValueError, match="unknown stage 'zzz'"):
        assign_keys([Stage("c", "probe", {}, {"w": Ref("zzz", "out")})])


def _expect_input_error(cfg: dict, error: type, match: str) -> str:
    assert not ray.is_initialized()
    with pytest.raises(error, match=match) as info:
        run_pipeline(cfg)
    assert not ray.is_initialized(), "bad input must be found before Ray starts"
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_input_fails_before_ray_starts(tmp_path):
    missing = tmp_path / "nowhere" / "instances.json"
    data = [
        f"eval.data.detection.train_images={tmp_path}",
        f"eval.data.detection.val_images={tmp_path}",
        f"eval.data.detection.val_annotations={missing}",
    ]
    _expect_input_error(
        config(tmp_path, *data, f"eval.data.detection.train_annotations={missing}"),
        ConfigError,
        "instances.json",
    )
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    message = _expect_input_error(
        config(
            tmp_path,
            f"eval.data.detection.train_images={tmp_path}",
            f"eval.data.detection.train_annotations={not_coco}",
            f"eval.data.detection.val_images={tmp_path}",
            f"eval.data.detection.val_annotations={not_coco}",
        ),
        CocoFormatError,
        "not_coco.json",
    )
    assert "annotations" in message or "categories" in message
    _expect_input_error(config(tmp_path, "stages=[pretrain,evaluate]"), ConfigError, "'evaluate'")
    _expect_input_error(
        config(tmp_path, f"pretrain.data={tmp_path / 'no_images_here'}"),
        FileNotFoundError,
        "no_images_here",
    )
    _expect_input_error(
        config(tmp_path, "stages=[detection]"), ConfigError, "needs the outputs of convert/dupr"
    )
    _expect_input_error(
        config(tmp_path, f"+baselines.checkpoints.moco={tmp_path / 'moco.pth'}"),
        ConfigError,
        "moco.pth",
    )
    _expect_input_error(config(tmp_path, "eval.detection.detectors=[yolo]"), ConfigError, "yolo")
    wrong = tmp_path / "wrong_keys.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, wrong)
    _expect_input_error(
        config(tmp_path, f"+baselines.checkpoints.other={wrong}"),
        ConversionError,
        "wrong_keys.pth: no ResNet backbone",
    )


def test_convert_refuses_a_checkpoint_without_a_backbone(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"head.weight": torch.zeros(3)}}, path)
    ctx = stage_context(tmp_path, "convert/x", {}, {"checkpoint": str(path)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="weights.pth: no ResNet backbone") as info:
        convert(ctx, out)
    assert "\n" not in str(info.value)
    assert not list(out.iterdir()), "nothing is written for a refused checkpoint"


def test_the_command_line_reports_bad_input_in_one_line_with_status_2():
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "pretrain_and_eval.py"), "preset=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: preset='nope': unknown (valid: cpu_demo, mocov2, paper_r50_coco, "
        "paper_r50_imagenet)"
    ]


def test_progress_lines_say_where_how_fast_and_how_long(capsys):
    progress = Progress("detection/x", total=100, unit="iter", every_s=3600)
    progress.start -= 10.0  # as if 10 s had passed
    progress.update(25, {"loss": 1.5})
    progress.update(30, {"loss": 1.4})  # within every_s: not printed
    progress.update(100, {"loss": 1.0})  # the last step is always printed
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[detection/x] iter 25/100 (25%) · 2.5")
    assert "loss 1.5" in lines[0] and lines[0].endswith("30s left")
    assert lines[1].startswith("[detection/x] iter 100/100 (100%)") and lines[1].endswith("0s left")


def test_view_sizes_of_the_analyses_follow_pretraining_unless_set(tmp_path):
    """Correspondence and probe see views at the pre-training size, the same for every init;
    the object probe the detection set's images as they are, unless a size is set."""

    def sizes(*overrides: str) -> dict[str, int | None]:
        stages = build_stages(config(tmp_path, *overrides))
        return {
            s.name: s.config["image_size"]
            for s in stages
            if s.kind in ("correspondence", "probe", "object_probe")
        }

    demo = preset("cpu_demo").model.image_size
    views = {k: v for k, v in sizes().items() if not k.startswith("object_probe/")}
    assert set(views.values()) == {demo} and len(views) == 6  # dupr, mocov2, random; 2 kinds
    assert {k: v for k, v in sizes().items() if k not in views} == dict.fromkeys(
        ("object_probe/dupr", "object_probe/mocov2", "object_probe/random")
    )
    resized = sizes("pretrain.method.model.image_size=128")
    assert resized["probe/dupr"] == resized["correspondence/random"] == 128
    assert resized["object_probe/dupr"] is None
    chosen = sizes("eval.correspondence.image_size=160", "eval.object_probe.image_size=176")
    assert chosen["correspondence/random"] == chosen["correspondence/dupr"] == 160
    assert chosen["probe/random"] == demo
    assert chosen["object_probe/random"] == chosen["object_probe/dupr"] == 176


def test_correspondence_reads_the_images_its_annotation_file_names(tmp_path, monkeypatch):
    """Not a folder listing: a file_name with a sub-folder is found, other files are ignored."""
    from dupr.data.bundled_eval import bundled_detection_set
    from dupr_platform import eval_stages
    from dupr_platform.eval_stages import correspondence

    source = bundled_detection_set()
    val = tmp_path / "val"
    shutil.copytree(source / "val", val)
    coco = json.loads((source / "annotations" / "instances_val.json").read_text())
    first = coco["images"][0]["file_name"]
    (val / "sub").mkdir()
    (val / first).rename(val / "sub" / first)
    coco["images"][0]["file_name"] = f"sub/{first}"
    coco["images"] = coco["images"][:3]
    kept = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    annotations = tmp_path / "instances_val.json"
    annotations.write_text(json.dumps(coco))
    (val / "notes.json").write_text("{}")  # a listing would try to decode these
    (val / "preview.txt").write_text("not an image")
    inputs = {
        "backbone": None,
        "train_images": str(val),
        "train_annotations": str(annotations),
        "val_images": str(val),
        "val_annotations": str(annotations),
    }
    ctx = stage_context(
        tmp_path,
        "correspondence/random",
        {
            "init": "random",
            "arch": "resnet18",
            "level": 2,
            "image_size": 64,
            "max_images": 16,
            "pairs_per_image": 1,
            "seed": 0,
        },
        inputs,
    )
    out = tmp_path / "out"
    out.mkdir()
    read: list[Path] = []
    real_load = eval_stages.load_rgb
    monkeypatch.setattr(eval_stages, "load_rgb", lambda p: read.append(Path(p)) or real_load(p))
    result = correspondence(ctx, out)
    assert result.metrics["valid_cells"] > 0
    assert list(result.metrics) == metric_names("correspondence", ctx.config)
    assert {"conv4/exact", "conv4/within_one", "conv5/exact", "conv5/within_one"} <= set(
        result.metrics
    )
    assert read == [val / im["file_name"] for im in coco["images"]]  # the three, in order


def test_a_new_method_revision_retrains_but_keeps_the_random_baseline(tmp_path, monkeypatch):
    """The method's code is part of a pre-training's key (dupr.config.METHOD_REVISION)."""
    import dupr_platform.pipeline as pipeline

    before = {s.name: s.key for s in build_stages(config(tmp_path))}
    monkeypatch.setattr(pipeline, "METHOD_REVISION", pipeline.METHOD_REVISION + 1)
    after = {s.name: s.key for s in build_stages(config(tmp_path))}
    changed = {name for name in before if before[name] != after[name]}
    assert "pretrain" in changed and "probe/dupr" in changed
    assert not any(name.endswith("/random") for name in changed)


def test_the_object_probe_stage_classifies_the_detection_sets_boxes_per_level(tmp_path):
    """The object_probe body on the bundled detection set: one accuracy per level, the names
    `metric_names` promises, written to the stage folder."""
    config = {"init": "random", "arch": "resnet18", "roi_size": 2, "image_size": 64, "C": 1.0}
    config["max_images"] = 8  # as the toy pipelines (tests/helpers.py)
    ctx = stage_context(tmp_path, "object_probe/random", {**config, "seed": 0}, {"backbone": None})
    out = tmp_path / "out"
    out.mkdir()
    result = BODIES["object_probe"](ctx, out)
    assert list(result.metrics) == metric_names("object_probe", ctx.config)
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert json.loads((out / "accuracy.json").read_text()) == result.metrics
