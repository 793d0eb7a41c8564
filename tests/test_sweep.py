"""A toy ablation sweep on a real local Ray instance (Ray Tune trials running the pipeline) with
tracking on a real MLflow server process."""

import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dupr.data.bundled_eval import bundled_detection_set
from dupr_platform.sweeps import load_grid, run_sweep
from helpers import CONFIGS, sweep_config

# Starts a local Ray instance (Ray Tune trials) and an MLflow server.
pytestmark = pytest.mark.slow


def detection_data(root: Path) -> dict:
    return {
        "eval.data.detection.train_images": str(root / "train"),
        "eval.data.detection.train_annotations": str(root / "annotations/instances_train.json"),
        "eval.data.detection.val_images": str(root / "val"),
        "eval.data.detection.val_annotations": str(root / "annotations/instances_val.json"),
    }


def test_sweep_table_nesting_failure_isolation_and_resume(local_ray, mlflow_server, tmp_path):
    """Three trials: two temperatures, and the first temperature again on data with a corrupt
    validation image (it shares that trial's pre-training through the stage cache). The broken
    trial's detection stage finds the image before it fine-tunes, and the trial is marked failed
    at once (a retry cannot repair data) while the sweep completes; once the image is repaired,
    running the same command again runs only that trial."""
    good, broken = tmp_path / "good", tmp_path / "broken"
    shutil.copytree(bundled_detection_set(), good)
    shutil.copytree(good, broken)
    image = sorted((broken / "val").iterdir())[0]
    pristine = image.read_bytes()
    image.write_bytes(b"not a jpeg")
    grid_file = tmp_path / "toy_tau.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "table": "toy temperature",
                "label": "tau",
                "fixed": detection_data(good),
                "values": [
                    {"label": "0.1", "set": {"pretrain.method.model.tau": 0.1}},
                    {"label": "0.3", "set": {"pretrain.method.model.tau": 0.3}},
                    {
                        "label": "0.1 broken data",
                        "set": {"pretrain.method.model.tau": 0.1, **detection_data(broken)},
                    },
                ],
            }
        )
    )
    grid = load_grid(str(grid_file), CONFIGS / "grid")
    # A trial runs the pipeline (test_pipeline.py runs every stage): here the cheapest
    # evaluation beside the detection that the broken trial fails.
    cfg = sweep_config(tmp_path, mlflow_server.uri, "stages=[pretrain,convert,spatial,detection]")

    first = run_sweep(cfg, grid)
    assert [r["label"] for r in first.rows] == ["0.1", "0.3", "0.1 broken data"]
    assert [r["status"] for r in first.rows] == ["done", "done", "failed"]
    assert image.name in first.rows[2]["error"]
    assert not first.ok
    for row in first.rows[:2]:
        assert 0 <= row["detection/faster_rcnn_fpn/bbox/AP"] <= 1
        assert "spatial/slope" in row
    # The difference to the first row, in brackets, as in the paper's tables.
    assert "(+" in first.table or "(-" in first.table or "(+0.0)" in first.table
    assert first.table.splitlines()[0].startswith("| tau | detection/faster_rcnn_fpn/bbox/AP")

    client = MlflowClient(mlflow_server.uri)
    sweep = client.get_run(first.run_id)
    assert sweep.data.tags["mlflow.runName"] == "toy-tau"
    assert sweep.data.tags["dupr.best"] in ("0.1", "0.3")
    assert {a.path for a in client.list_artifacts(first.run_id)} >= {
        "sweep_table.md",
        "sweep_table.csv",
        "sweep_table.json",
        "config",
    }
    exp = sweep.info.experiment_id
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{first.run_id}'")
    by_label = {t.data.params["grid.label"]: t for t in trials}
    assert set(by_label) == {"0.1", "0.3", "0.1 broken data"}
    best = sweep.data.tags["dupr.best"]
    assert {k for k, t in by_label.items() if t.data.tags.get("dupr.best") == "true"} == {best}
    assert by_label["0.3"].data.params["grid.pretrain.method.model.tau"] == "0.3"
    stages = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{by_label['0.1'].info.run_id}'"
    )
    assert {s.data.tags.get("dupr.stage") for s in stages} == {
        "pretrain",
        "convert/dupr",
        "spatial/dupr",
        "detection/faster_rcnn_fpn/dupr",
    }
    broken_stages = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{by_label['0.1 broken data'].info.run_id}'"
    )
    pretrain = [s for s in broken_stages if s.data.tags.get("dupr.stage") == "pretrain"]
    assert pretrain and pretrain[0].data.tags["dupr.cache_hit"] == "true"  # shared with "0.1"
    (detection,) = [s for s in broken_stages if s.data.tags["dupr.stage"].startswith("detection")]
    assert detection.info.status == "FAILED"
    assert not [k for k in detection.data.metrics if k.startswith("train/")]  # not fine-tuned
    # The trial ended itself with its message; Tune saw no error, so it retried nothing.
    assert not list((tmp_path / "storage" / "toy-tau" / "tune").glob("*/trial_*/error*"))
    # Every trial's outputs live under the sweep's name in the storage.
    assert any((tmp_path / "storage" / "toy-tau" / "stages").glob("pretrain-*/_COMPLETE.json"))

    image.write_bytes(pristine)
    second = run_sweep(cfg, grid)
    assert [r["status"] for r in second.rows] == ["stored", "stored", "done"]
    assert second.ok and second.run_id == first.run_id


def test_early_stopping_sees_the_pretraining_loss_every_epoch(local_ray, tmp_path):
    """With ASHA on, each pre-training epoch's report reaches Tune (TuneReportCallback), so
    the scheduler can stop a trial during pre-training; then the final row follows."""
    grid_file = tmp_path / "one.yaml"
    grid_file.write_text("key: pretrain.method.model.tau\nvalues: [0.2]\n")
    cfg = sweep_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'm.db'}",
        "sweep.name=asha",
        "sweep.early_stopping=true",
        "pretrain.method.optim.epochs=2",
        "stages=[pretrain,convert,probe]",
    )
    result = run_sweep(cfg, load_grid(str(grid_file), CONFIGS / "grid"))
    assert [r["status"] for r in result.rows] == ["done"]
    progress = list((tmp_path / "storage" / "asha" / "tune").glob("*/*/progress.csv"))
    assert len(progress) == 1
    lines = progress[0].read_text().strip().splitlines()
    header = lines[0].split(",")
    losses = [row.split(",")[header.index("loss")] for row in lines[1:]]
    assert len(losses) == 3  # epoch 1, epoch 2, the finished trial
    assert all(float(v) > 0 for v in losses)
