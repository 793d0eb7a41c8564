"""The smoke run (`smoke=true`, dupr_platform.smoke): every stage of a preset's exact
configuration for a few steps, its step times and peak memory, and the full run's estimate.

The end-to-end tests run the paper presets as a user does, with their data absent (the
`DUPR_*` variables unset), on this machine's CPUs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from drivers import ABLATE, PIPELINE, run
from dupr.config import ConfigError
from dupr.data.coco import CocoDetection
from dupr.train import StepGraph
from dupr_platform import smoke
from dupr_platform.configs import compose
from dupr_platform.eval_stages import check_classes, first_images
from dupr_platform.pipeline import StageReport
from helpers import CONFIGS, TOY_PIPELINE

DATA_VARIABLES = ("DUPR_IMAGENET_SHARDS", "DUPR_VOC_ROOT", "DUPR_COCO_ROOT")


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DATA_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def paper(tmp_path: Path, preset: str = "paper_r50_imagenet", *extra: str) -> dict:
    return compose(
        CONFIGS,
        "pretrain_and_eval",
        [
            f"preset={preset}",
            f"storage={tmp_path / 'storage'}",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


def test_a_preset_whose_data_is_absent_composes_for_a_smoke_run_only(tmp_path, no_data):
    values = paper(tmp_path, "paper_r50_coco", "smoke=true")
    assert values["pretrain"]["data"] is None  # the bundled photos stand in
    assert set(values["eval"]["data"]["detection"].values()) == {None}  # the bundled set
    unset = r"pretrain.data: the environment variable DUPR_IMAGENET_SHARDS is not set"
    with pytest.raises(ConfigError, match=unset):
        paper(tmp_path, "paper_r50_coco")


def test_the_smoke_config_keeps_the_model_and_cuts_the_run(tmp_path, no_data):
    study = paper(tmp_path, "paper_r50_imagenet", "smoke=true")
    prepared = smoke.prepare(study)
    on_cpu = smoke.fit(prepared, {"CPU": 2.0})
    on_gpu = smoke.fit(prepared, {"CPU": 16.0, "GPU": 1.0})
    for cfg in (on_cpu, on_gpu):
        # The model, its banks and the detector's scales are the preset's.
        assert cfg["pretrain"]["method"]["model"] == study["pretrain"]["method"]["model"]
        assert cfg["pretrain"]["method"]["model"]["queue_size"] == 65536
        for key in ("detectors", "min_size", "max_size", "norm", "overrides"):
            assert cfg["eval"]["detection"][key] == study["eval"]["detection"][key]
        assert cfg["pretrain"]["num_workers"] == 1
        assert cfg["pretrain"]["method"]["optim"]["epochs"] == 1
        assert cfg["experiment"] == "dupr-smoke" and cfg["name"].endswith("-smoke")
        assert cfg["storage"].endswith("/smoke") and cfg["baselines"]["random"] is False
        assert cfg["eval"]["correspondence"]["max_images"] == smoke.SMOKE_IMAGES
        # The pre-training reads a slice of SMOKE_STEPS batches, as Parquet shards.
        index = json.loads((Path(cfg["pretrain"]["data"]) / "_index.json").read_text())
        batch = cfg["pretrain"]["method"]["optim"]["batch_size"]
        assert index["total"] == batch * smoke.SMOKE_STEPS
    # A CPU: small batches; a GPU: the full per-device batch (256 over 8 workers).
    assert on_cpu["pretrain"]["method"]["optim"]["batch_size"] == 2
    assert on_cpu["pretrain"]["use_gpu"] is False
    assert on_cpu["eval"]["detection"]["batch_size"] == 1
    assert on_cpu["eval"]["detection"]["iterations"] == smoke.CPU_DETECTION_STEPS
    # Its Ray Data actor, the worker and Ray Data's listing task fit on 2 CPUs.
    p = on_cpu["pretrain"]
    assert p["cpus_per_worker"] + p["ray_data_decoders"] * p["ray_data_cpus_per_decoder"] + 1 <= 2
    assert on_gpu["pretrain"]["method"]["optim"]["batch_size"] == 32
    assert on_gpu["pretrain"]["use_gpu"] is True
    assert on_gpu["eval"]["detection"]["batch_size"] == 16
    assert on_gpu["eval"]["detection"]["iterations"] == smoke.SMOKE_STEPS


def test_a_smoke_run_with_the_cuda_graph_captures_it_and_times_its_replays(tmp_path, no_data):
    """optim.cuda_graph runs StepGraph.WARMUP_STEPS eager steps before the one that captures: a
    GPU smoke run reads that many batches more, so that it captures the graph (a capture that
    fails, fails here and not in the real run), and times only the replays."""
    prepared = smoke.prepare(paper(tmp_path, "paper_r50_imagenet", "smoke=true"))
    prepared["pretrain"]["method"]["optim"]["cuda_graph"] = True
    on_gpu = smoke.fit(prepared, {"CPU": 16.0, "GPU": 1.0})["pretrain"]
    index = json.loads((Path(on_gpu["data"]) / "_index.json").read_text())
    untimed = smoke.untimed_steps(cuda_graph=True, on_gpu=True)
    assert untimed == 1 + StepGraph.WARMUP_STEPS + 1
    assert index["total"] == 32 * (untimed + smoke.SMOKE_STEPS - 1)
    assert smoke.untimed_steps(cuda_graph=True, on_gpu=False) == 1  # a CPU has no graphs
    timer = smoke.StepTimer(untimed)
    timer.times = [9.0, 2.0, 2.0, 2.0, 5.0, 0.5, 0.5]  # first, eager warm-up, capture, replays
    assert timer.step_s() == 0.5


def test_the_pretraining_slice_of_a_shard_set(tmp_path):
    from dupr_platform.ray_pretrain import default_data

    sliced = smoke.pretrain_slice(default_data(), 4, str(tmp_path))  # shards in, shards out
    assert json.loads((Path(sliced) / "_index.json").read_text())["total"] == 4
    assert smoke.pretrain_slice(default_data(), 4, str(tmp_path)) == sliced  # written once


def _profiled(batch: int, peak: float, gflop: float, step_s: float = 1.0) -> dict:
    return {
        "profile/batch": float(batch),
        "profile/peak_memory_gib": peak,
        "profile/on_gpu": 0.0,
        "profile/gflop_per_step": gflop,
        "profile/step_s": step_s,
    }


def test_the_estimate_and_the_memory_check(tmp_path, no_data):
    study = paper(tmp_path, "paper_r50_imagenet", "smoke=true")
    reports = [
        StageReport("pretrain", "done", _profiled(2, 1.5, 88.92)),
        StageReport("convert/dupr", "done", {"profile/peak_memory_gib": 0.5}),
        StageReport("detection/faster_rcnn_c4/dupr", "done", _profiled(1, 4.0, 600.0)),
    ]
    rows, failures = smoke.figures(study, reports)
    by_name = {f.name: f for f in rows}
    pre, det = by_name["pretrain"], by_name["detection/faster_rcnn_c4/dupr"]
    # 200 epochs of ImageNet-1k's 1,281,167 images at a global batch of 256.
    assert pre.full_steps == 200 * (1281167 // 256)
    # 32 per device is 16x the smoke batch: 16x the FLOPs at 100 TFLOP/s, on 8 GPUs.
    assert math.isclose(pre.gpu_hours, pre.full_steps * 88.92 * 16 / 100e3 * 8 / 3600)
    assert pre.projected_gib == pytest.approx(1.5 * 16)
    assert det.full_steps == 24000
    assert math.isclose(det.gpu_hours, 24000 * 600.0 * 16 / 100e3 / 3600)
    assert failures == []  # 24 and 64 GiB fit in 80
    # Random initialisation's fine-tuning (left out of the smoke run) counts like the model's.
    assert smoke.total_gpu_hours(study, rows) == pytest.approx(pre.gpu_hours + 2 * det.gpu_hours)

    small = paper(tmp_path, "paper_r50_imagenet", "smoke=true", "estimate.device_memory_gib=30")
    _, failures = smoke.figures(small, reports)
    assert len(failures) == 1
    assert failures[0].startswith("detection/faster_rcnn_c4/dupr: peak memory 64.0 GiB")
    assert "estimate.device_memory_gib=30" in failures[0]
    text, _ = smoke.report(small, reports)
    assert "ESTIMATE, not a measurement" in text and "FAILED at full size" in text


def _coco(tmp_path: Path) -> CocoDetection:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100.0},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100.0},
        {
            "id": 3,
            "image_id": 3,
            "category_id": 2,
            "bbox": [5, 5, 9, 9],
            "area": 81.0,
            "iscrowd": 1,
        },
    ]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "cow"}]
    return CocoDetection(
        tmp_path, {"images": images, "annotations": anns, "categories": cats}, source="toy.json"
    )


def test_a_class_without_training_boxes_fails_the_smoke_run(tmp_path):
    data = _coco(tmp_path)
    with pytest.raises(ConfigError, match=r"toy.json: 1 of 2 classes have no training box \(cow\)"):
        check_classes(data)  # its only box is a crowd region
    first = first_images(data, 2)
    assert [im["id"] for im in first.coco["images"]] == [1, 2]
    assert [a["id"] for a in first.coco["annotations"]] == [1]  # only the slice's ground truth
    assert first.num_classes == 2


def test_peak_memory_on_a_cpu_sees_an_allocation(monkeypatch):
    """A block freed at once still counts, after other tests freed memory that stayed resident
    (glibc reuses it; without malloc_trim at the start the block added nothing): Linux's own
    peak, and the sampler where the kernel keeps no resettable peak (the block lives 0.2 s)."""
    for kernel_peak in (True, False):
        if not kernel_peak:
            monkeypatch.setattr(smoke, "reset_peak_rss", lambda: False)
        memory = smoke.PeakMemory(torch.device("cpu")).start()
        block = torch.ones(64 * 2**20)  # 256 MiB, touched
        if not kernel_peak:
            time.sleep(0.2)
        del block
        assert 0.2 < memory.stop() < 2.0, kernel_peak


# ---------------------------------------------------------------------------------------------
# The user's path


@pytest.mark.slow
def test_smoke_runs_of_the_paper_presets_on_cpu(tmp_path, no_data):
    where = [f"storage={tmp_path / 'storage'}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    status, out = run(
        [PIPELINE, "preset=paper_r50_imagenet", "smoke=true", *where], tmp_path / "voc.log"
    )
    assert status == 0, out[-4000:]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in out.split("smoke run of", 1)[1].split("ESTIMATE")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| stage")
    }
    stages = ["pretrain", "convert/dupr", "spatial/dupr", "correspondence/dupr"]
    stages += ["probe/dupr", "object_probe/dupr", "detection/faster_rcnn_c4/dupr"]
    assert set(rows) == set(stages)
    for name in stages:
        status_, device, batch, step_s, peak = rows[name][:5]
        assert status_ == "done" and device == "CPU" and float(peak) >= 0
    assert rows["pretrain"][2] == "2 (full 32)" and float(rows["pretrain"][3]) > 0
    assert rows["detection/faster_rcnn_c4/dupr"][2] == "1 (full 16)"
    assert "1,281,167 images per epoch" in rows["pretrain"][-1]
    assert float(rows["pretrain"][7].replace(",", "")) > 0  # GPU-hours
    assert "ESTIMATE, not a measurement: the full run needs about" in out
    assert (tmp_path / "storage" / "smoke" / "stages").is_dir()

    # The COCO preset shares the pre-training and the analyses; its Mask R-CNN runs. What
    # would not fit at full size fails the run (exit 1) after every stage has run.
    status, out = run(
        [PIPELINE, "preset=paper_r50_coco", "smoke=true", "estimate.device_memory_gib=2", *where],
        tmp_path / "coco.log",
    )
    assert status == 1, out[-4000:]
    assert "[pipeline] pretrain: cache hit" in out
    assert "[pipeline] detection/mask_rcnn_fpn/dupr: done" in out
    assert "FAILED at full size: pretrain: peak memory" in out
    assert "exceeds estimate.device_memory_gib=2 GiB" in out


@pytest.mark.slow
def test_a_sweep_smoke_runs_each_trial(tmp_path):
    """Each trial is a smoke run with its report; one that would not fit at full size fails at
    once, as a retry cannot change that."""
    grid = tmp_path / "two.yaml"
    grid.write_text("key: pretrain.method.model.tau\nvalues: [0.2]\n")
    status, out = run(
        [
            ABLATE,
            "--grid",
            str(grid),
            "smoke=true",
            "estimate.device_memory_gib=1",
            f"storage={tmp_path / 'storage'}",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *TOY_PIPELINE,
        ],
        tmp_path / "sweep.log",
    )
    assert status == 1, out[-4000:]
    # Printed by the driver from the trial's result, not forwarded from the trial's stdout,
    # which Ray may not deliver before the driver ends.
    assert out.count("smoke run of") == 1
    assert out.index("[sweep] trial 0.2:") < out.index("smoke run of") < out.index("| tau |")
    assert "ESTIMATE, not a measurement" in out
    assert "FAILED at full size: pretrain: peak memory" in out
    assert out.count("stages to run") == 1  # not retried
    (row,) = [line for line in out.splitlines() if line.startswith("| 0.2 |")]
    assert "| failed: pretrain: peak memory" in row and "device_memory_gib=1 GiB" in row, row
