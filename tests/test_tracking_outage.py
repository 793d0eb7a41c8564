"""The MLflow tracking server goes away mid-run and comes back (a restart, a rescheduled pod).

The server (a real `mlflow server` process with its SQLite store) is stopped after the first
pre-training checkpoint and started again on the same port 30 s later; MLflow's client does
not retry (its own retries would ride out 4 minutes), so the outage is one the platform must
handle. The main job must go on training meanwhile, its checkpoints carrying the metrics the
server did not take, and finish, with its run FINISHED and every step of the loss once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from drivers import PIPELINE, PROJECT_LINE, Driver
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import _clean_env, _stop, _wait_http, free_port

# Starts an MLflow server of its own (twice) and a driver process that starts Ray.
pytestmark = pytest.mark.slow


def _serve(workdir: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on `port` over the store in `workdir`; up when this returns."""
    log_path = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=_clean_env(),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_http(f"http://127.0.0.1:{port}/health", proc, 180, log_path)
    return proc


def _checkpointed(storage: Path) -> bool:
    return any(
        "checkpoint_epoch=" in p.read_text()
        for p in storage.rglob("checkpoint_manager_snapshot.json")
    )


def test_a_tracking_server_restart_mid_pretraining_is_ridden_out(tmp_path):
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
        "stages=[pretrain]",
        "baselines.random=false",
    ]
    # MLflow's client retries a call for about 4 minutes; with no retries, a 30 s outage
    # stands for a longer one.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    driver = Driver(args, tmp_path / "driver.txt", env=env)
    try:
        driver.wait_for(lambda: _checkpointed(storage), 300, "first checkpoint")
        _stop(server)
        time.sleep(30)
        server = _serve(tmp_path, port)
        status = driver.wait(400)
    finally:
        driver.stop()
        _stop(server)
    output = driver.output()
    assert status == 0, output[-4000:]
    assert "Traceback" not in output
    # Said once, in one short line, and again when the server is back.
    down = [line for line in output.splitlines() if "unreachable" in line]
    assert down == [
        f"[pipeline] tracking {uri}: unreachable ([Errno 111] Connection refused); training "
        "goes on, its metrics are kept until the server is back"
    ], output[-4000:]
    strangers = [line for line in output.splitlines() if line and not PROJECT_LINE.match(line)]
    assert not strangers, strangers  # nor MLflow's "View run" lines of a tracking server
    # Trained on while the server was down: a checkpoint carried what it had not taken.
    assert list(storage.rglob("unsent_metrics.json")), output[-4000:]
    client = MlflowClient(uri)
    server = _serve(tmp_path, port)
    try:
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        (pretrain,) = [r for r in runs if r.data.tags.get("dupr.stage") == "pretrain"]
        assert pretrain.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
        assert steps == list(range(1, 33)), steps
    finally:
        _stop(server)
