"""`ray job submit` of the pipeline to a Ray head node started by this test on loopback, then
`ray job stop` after the first pre-training checkpoint and the same job submitted again.

Ray 2.60 enables token authentication: the head and every client present the test's own token
(services.ray_head). The test stops only the head it started (its process group), never
`ray stop`.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import BIN

# Starts a `ray start --head` process and jobs submitted to it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _ray(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=head.env, capture_output=True, text=True, timeout=timeout
    )


def _submit(head, submission_id: str, overrides: list[str]) -> None:
    runtime_env = {
        "env_vars": {
            "DUPR_DATA_HOME": os.path.abspath(os.environ["DUPR_DATA_HOME"]),
            # `ray job stop`'s grace before SIGKILL, as the README suggests (Ray's default: 3 s)
            "RAY_JOB_STOP_WAIT_TIME_S": "30",
        }
    }
    submit = _ray(
        head,
        *("job", "submit", "--address", head.dashboard, "--no-wait"),
        *("--submission-id", submission_id, "--working-dir", str(ROOT)),
        *("--runtime-env-json", json.dumps(runtime_env)),
        *("--", "python", "pipelines/pretrain_and_eval.py", *overrides),
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]


def _status(head, submission_id: str) -> str:
    probe = _ray(head, "job", "status", "--address", head.dashboard, submission_id)
    return (probe.stdout + probe.stderr).lower()  # Ray's CLI logger writes to stderr


def _wait_end(head, submission_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _status(head, submission_id)
        if any(f"' {s}" in status for s in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(5)
    return status


def test_ray_job_submit_runs_the_pipeline_and_resumes_after_ray_job_stop(ray_head, tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "storage"
    overrides = [
        "name=submitted",
        f"storage={storage}",
        f"tracking_uri={tracking}",
        "baselines.random=false",
        f"pretrain.data={bundled_image_folder(64)}",
        *TOY_PIPELINE,
        "pretrain.method.optim.epochs=6",  # 8 steps per epoch: time to stop it mid-run
    ]

    # Stopped by `ray job stop` once pre-training has its first checkpoint.
    _submit(ray_head, "dupr-first", overrides)
    deadline = time.monotonic() + 300
    while not any(
        "checkpoint_epoch=0001" in p.read_text()
        for p in storage.rglob("checkpoint_manager_snapshot.json")
    ):
        assert time.monotonic() < deadline, _status(ray_head, "dupr-first")
        time.sleep(0.5)
    stop = _ray(ray_head, "job", "stop", "--address", ray_head.dashboard, "dupr-first")
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert "job 'dupr-first' was stopped" in _wait_end(ray_head, "dupr-first", 120)
    # The driver's own SIGTERM handler ran (ray.init had replaced it): one line, no stack dump.
    first = _ray(ray_head, "job", "logs", "--address", ray_head.dashboard, "dupr-first").stdout
    assert "error: terminated; the same command resumes" in first, first[-3000:]
    assert "SIGTERM received" not in first and "Traceback" not in first, first[-3000:]

    # Submitted again: it resumes and completes.
    _submit(ray_head, "dupr-second", overrides)
    status = _wait_end(ray_head, "dupr-second", 480)
    logs = _ray(ray_head, "job", "logs", "--address", ray_head.dashboard, "dupr-second").stdout
    assert "job 'dupr-second' succeeded" in status, logs[-5000:]
    assert "| detection/faster_rcnn_fpn/dupr | done" in logs  # the printed summary table
    # Progress lines from the Ray Train worker reach the job's log once each.
    finished = [line for line in logs.splitlines() if "[pretrain " in line and "(100%)" in line]
    assert len(finished) == 1, finished

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("dupr").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    assert not [r.data.tags.get("mlflow.runName") for r in runs if r.info.status == "RUNNING"]
    parents = client.search_runs([exp], "tags.`dupr.pipeline` = 'submitted'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    pretrain = [r for r in runs if r.data.tags.get("dupr.stage") == "pretrain"]
    assert len(pretrain) == 1 and pretrain[0].info.status == "FINISHED"
    assert int(pretrain[0].data.tags["dupr.resumed_at_step"]) > 0
    steps = sorted(m.step for m in client.get_metric_history(pretrain[0].info.run_id, "loss"))
    assert steps == list(range(1, 49))  # no gap, no duplicate
