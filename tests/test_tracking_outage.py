"""The MLflow tracking server goes away mid-run and comes back (a restart, a rescheduled pod).

The server (a real `mlflow server` process with its SQLite store) is stopped after the first
pre-training checkpoint and started again on the same port 30 s later, then while the weight
conversion runs (it ends, and the fine-tuning is launched, while the server is away), then
while a detection fine-tuning runs. MLflow's client does not retry (its own retries ride out
about 4 minutes), so each outage is one the platform must handle. The main job must train on
meanwhile, its checkpoints carrying the metrics the server did not take, and finish, with
every run FINISHED and every step once.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from drivers import PIPELINE, PROJECT_LINE, Driver
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import _clean_env, _stop, free_port, start_mlflow_server

# Starts an MLflow server of its own (twice) and a driver process that starts Ray.
pytestmark = pytest.mark.slow


def _serve(workdir: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on `port` over the store in `workdir` (kept across restarts)."""
    return start_mlflow_server(workdir, port, str(workdir / "artifacts"), _clean_env(), 180)


def _checkpointed(storage: Path) -> bool:
    return any(
        "checkpoint_epoch=" in p.read_text()
        for p in storage.rglob("checkpoint_manager_snapshot.json")
    )


def _saved_since(storage: Path, pattern: str, since_ns: int) -> bool:
    return any(p.stat().st_mtime_ns > since_ns for p in storage.glob(pattern))


def test_tracking_server_restarts_mid_pretraining_and_mid_fine_tuning_are_ridden_out(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _serve(tmp_path, port)
    storage = tmp_path / "storage"
    args = [
        PIPELINE,
        f"storage={storage}",
        f"tracking_uri={uri}",
        "experiment=outage",
        f"pretrain.data={bundled_image_folder(64)}",
        *TOY_PIPELINE,
        "pretrain.method.optim.epochs=4",  # 8 steps per epoch
        "stages=[pretrain,convert,detection]",
        "baselines.random=false",
        "eval.detection.iterations=16",
        "eval.detection.checkpoint_minutes=0.05",  # every 3 s
        "eval.detection.log_every=1",
    ]
    resume_state = "stages/detection-*/resume/finetune.pt"
    # MLflow's client retries a call for about 4 minutes; with no retries, a 30 s outage
    # stands for a longer one.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    driver = Driver(args, tmp_path / "driver.txt", env=env)
    try:
        driver.wait_for(lambda: _checkpointed(storage), 300, "first checkpoint")
        _stop(server)
        time.sleep(30)
        server = _serve(tmp_path, port)
        # The conversion's worker tags its run at its end, and the driver opens the
        # fine-tuning's run to launch it: both wait for the server.
        driver.wait_for(lambda: "convert/dupr: submitted" in driver.output(), 300, "convert")
        _stop(server)
        time.sleep(15)
        server = _serve(tmp_path, port)
        driver.wait_for(lambda: any(storage.glob(resume_state)), 300, "fine-tuning checkpoint")
        _stop(server)
        down_since = time.time_ns()
        # The fine-tuning saves its state meanwhile, with the losses the server did not take.
        driver.wait_for(lambda: _saved_since(storage, resume_state, down_since), 60, "a save")
        (state,) = storage.glob(resume_state)
        assert torch.load(state, weights_only=True)["unsent_metrics"]
        time.sleep(20)
        server = _serve(tmp_path, port)
        status = driver.wait(400)
        output = driver.output()
        assert status == 0, output[-4000:]
        assert "Traceback" not in output
        # Said in one short line an outage (the driver's heartbeat saw one or both).
        down = [line for line in output.splitlines() if "unreachable" in line]
        assert 1 <= len(down) <= 3 and set(down) == {
            f"[pipeline] tracking {uri}: unreachable ([Errno 111] Connection refused); "
            "training goes on, its metrics are kept until the server is back"
        }, output[-4000:]
        lines = output.splitlines()
        strangers = [line for line in lines if line and not PROJECT_LINE.match(line)]
        assert not strangers, strangers  # nor MLflow's "View run" lines of a tracking server
        # The pre-training trained on while the server was down: a checkpoint carried what
        # the server had not taken.
        assert list(storage.rglob("unsent_metrics.json")), output[-4000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        (pretrain,) = [r for r in runs if r.data.tags.get("dupr.stage") == "pretrain"]
        (detection,) = [
            r for r in runs if r.data.tags.get("dupr.stage", "").startswith("detection")
        ]
        assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
        steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
        assert steps == list(range(1, 33)), steps  # every step once
        history = client.get_metric_history(detection.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 17))
    finally:
        driver.stop()
        _stop(server)
