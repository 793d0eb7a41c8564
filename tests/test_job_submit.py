"""`ray job submit` of the pipeline to a Ray head node started by this test on loopback.

Ray 2.60 enables token authentication: the head and every client must present the same token.
The test gives both its own token through RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, so it
neither reads nor writes the user's ~/.ray/auth_token. It stops only the head it started
(its process group), never `ray stop`.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import TOY_PIPELINE
from services import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    token = secrets.token_hex(16)
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the head resolves `python`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # A short temp dir: Ray's Unix socket paths must stay under ~100 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayh")
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--num-cpus=2", f"--temp-dir={temp_dir}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up: {probe.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the group this fixture created, nothing else
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    address, env = ray_head
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data_home = os.environ["DUPR_DATA_HOME"]
    runtime_env = {"env_vars": {"DUPR_DATA_HOME": os.path.abspath(data_home)}}
    overrides = [
        "name=submitted",
        f"storage={tmp_path / 'storage'}",
        f"tracking_uri={tracking}",
        "baselines.random=false",
        *TOY_PIPELINE,
    ]
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
            "--submission-id", "dupr-pipeline-test", "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env),
            "--", "python", "pipelines/pretrain_and_eval.py", *overrides,
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-3000:]

    deadline = time.monotonic() + 420
    status = ""
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", address, "dupr-pipeline-test"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        status = (probe.stdout + probe.stderr).lower()  # Ray's CLI logger writes to stderr
        if any(f"' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", address, "dupr-pipeline-test"],
        env=env, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    assert "job 'dupr-pipeline-test' succeeded" in status, logs[-5000:]
    assert "| detection/faster_rcnn_fpn/dupr | done" in logs  # the printed summary table
    # Progress lines from the Ray Train worker reach the job's log once each.
    finished = [line for line in logs.splitlines() if "[pretrain " in line and "(100%)" in line]
    assert len(finished) == 1, finished

    client = MlflowClient(tracking)
    parents = client.search_runs(
        [client.get_experiment_by_name("dupr").experiment_id],
        "tags.`dupr.pipeline` = 'submitted'",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
