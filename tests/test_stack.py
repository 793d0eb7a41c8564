"""The local multi-node stack (`python -m dupr_platform.stack`) end to end, as a user runs it.

One stack for the module: PostgreSQL behind the MLflow server, moto's S3 server, a Ray head
and two worker nodes, each a process group that `up` started and `down` stops. On it:

- the study, by `ray job submit`, with its two training workers on the two worker nodes; one
  of those nodes is killed after the first checkpoint and a replacement joins (`add-worker`),
  and the job still completes; its runs are in PostgreSQL, its checkpoints and artifacts in
  the bucket, and the fake secret is in no file the stack or Ray wrote;
- the MLflow UI of that job in headless Chromium (Debian's, driven by Playwright), with
  screenshots kept under the test's tmp dir;
- a two-trial sweep with both trials at once, the MLflow server under concurrent writers;
- `down`, which stops every process `up` started and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from drivers import files_holding, files_under
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import FAKE_KEY, FAKE_SECRET, list_keys

# Starts PostgreSQL, moto, an MLflow server and three Ray nodes, and jobs on them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUDY = "stack-study"


@dataclass
class Stack:
    root: Path
    env: dict[str, str]  # a client's: the secrets, and what `up` printed to export
    state: dict
    printed: str

    @property
    def services(self) -> dict:
        return self.state["services"]

    @property
    def bucket(self) -> str:
        return self.services["s3"]["bucket"]

    @property
    def s3(self) -> str:
        return self.services["s3"]["endpoint"]

    @property
    def mlflow(self) -> str:
        return self.services["mlflow"]["uri"]

    @property
    def dashboard(self) -> str:
        return self.services["ray-head"]["dashboard"]

    def cli(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dupr_platform.stack", *args, "--dir", str(self.root)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def refresh(self) -> None:
        status = self.cli("status", "--json")
        self.state = json.loads(status.stdout)

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _exports(printed: str) -> dict[str, str]:
    """The variables of the `export ...` line that `up` prints."""
    line = next(x for x in printed.splitlines() if x.startswith("export "))
    return dict(item.split("=", 1) for item in line.split()[1:])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A short folder (Ray's socket paths) that the postgres user can reach (PostgreSQL refuses
    # to run as root, so the stack runs it as that user).
    root = Path(tempfile.mkdtemp(prefix="dupr-stack-"))
    root.chmod(0o755)
    secret = f"{FAKE_SECRET}-{uuid.uuid4().hex}"  # unique, so a leak is found by search
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))},
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "PYTHONUNBUFFERED": "1",
    }
    start = time.monotonic()
    up = subprocess.run(
        [sys.executable, "-m", "dupr_platform.stack", "up", "--dir", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"stack up in {time.monotonic() - start:.0f} s, in {root}:\n{up.stdout}")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exported = _exports(up.stdout)
        stack = Stack(root, env | exported, {}, up.stdout)
        stack.refresh()
        yield stack
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "dupr_platform.stack", "down", "--dir", str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(down.stdout, down.stderr)
        shutil.rmtree(root, ignore_errors=True)


def _submit(stack: Stack, submission_id: str, script: str, args: list[str]) -> None:
    submit = stack.ray(
        *("job", "submit", "--no-wait", "--submission-id", submission_id),
        *("--working-dir", str(ROOT), "--", "python", script, *args),
    )
    assert submit.returncode == 0, submit.stderr[-3000:]


def _wait_end(stack: Stack, submission_id: str, timeout: float) -> tuple[str, str]:
    """The job's final status line and its logs."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        probe = stack.ray("job", "status", submission_id)
        status = (probe.stdout + probe.stderr).lower()
        if any(f"' {s}" in status for s in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(3)
    logs = stack.ray("job", "logs", submission_id).stdout
    return status, logs


def _training_nodes(stack: Stack) -> list[str]:
    """The custom resource of the node of each alive Ray Train worker (e.g. stack_worker_1)."""

    def listed(*args: str) -> list[dict]:
        found = stack.ray("list", *args, "--format", "json", "--limit", "1000")
        assert found.returncode == 0, found.stderr[-2000:]
        return json.loads(found.stdout) if found.stdout.startswith("[") else []  # or "No ..."

    actors = listed("actors", "-f", "class_name=RayTrainWorker", "-f", "state=ALIVE")
    nodes = {n["node_id"]: n for n in listed("nodes", "--detail")}
    names = []
    for actor in actors:
        names += [r for r in nodes[actor["node_id"]]["resources_total"] if r.startswith("stack_")]
    return sorted(names)


def _registered_checkpoint(stack: Stack, prefix: str) -> bool:
    """Ray Train has recorded a first checkpoint of a run under `prefix` in the bucket."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    for key in list_keys(stack.s3, stack.bucket, prefix):
        if key.endswith("checkpoint_manager_snapshot.json"):
            body = s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
            if b"checkpoint_epoch=0001" in body:
                return True
    return False


@pytest.fixture(scope="module")
def study(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The study submitted to the stack; a training node is lost after the first checkpoint."""
    start = time.monotonic()
    overrides = [
        f"name={STUDY}",
        f"storage=s3://{stack.bucket}/studies",
        f"tracking_uri={stack.mlflow}",
        "experiment=stack",
        "baselines.random=false",
        # What the UI check needs (stage runs, a plot); test_job_submit.py runs every stage.
        "stages=[pretrain,convert,spatial]",
        f"pretrain.data={bundled_image_folder(64)}",
        *TOY_PIPELINE,
        "pretrain.method.optim.epochs=4",  # 8 steps per epoch: time for the node loss
        "pretrain.num_workers=2",
        "pretrain.cpus_per_worker=2",  # a worker node's CPUs: one training worker per node
    ]
    _submit(stack, "study", "pipelines/pretrain_and_eval.py", overrides)
    deadline = time.monotonic() + 300
    placed: list[str] = []
    while len(placed) < 2 and time.monotonic() < deadline:
        placed = _training_nodes(stack)
        time.sleep(1)
    while not _registered_checkpoint(stack, "studies/") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert time.monotonic() < deadline, _wait_end(stack, "study", 1)[1][-4000:]
    # Node loss: worker-1's process group (its `ray start`, raylet and workers) killed at once.
    os.killpg(stack.services["worker-1"]["pid"], signal.SIGKILL)
    killed_after = time.monotonic() - start
    lost = stack.cli("status")  # what the user sees: the lost node DOWN, exit status 1
    for _ in range(10):  # until the kernel has reaped it
        if lost.returncode == 1:
            break
        time.sleep(0.5)
        lost = stack.cli("status")
    added = stack.cli("add-worker")
    assert added.returncode == 0, added.stdout + added.stderr
    status, logs = _wait_end(stack, "study", 480)
    (tmp_path_factory.mktemp("study") / "job.log").write_text(logs)
    stack.refresh()
    print(
        f"study: node killed after {killed_after:.0f} s, job done after "
        f"{time.monotonic() - start:.0f} s"
    )
    # The MLflow names of the stage runs, by stage, for the browser test.
    client = MlflowClient(stack.mlflow)
    runs = client.search_runs([client.get_experiment_by_name("stack").experiment_id])
    names = {r.data.tags.get("dupr.stage"): r.data.tags["mlflow.runName"] for r in runs}
    return {
        "status": status,
        "logs": logs,
        "placed": placed,
        "stage_runs": names,
        "status_after_the_loss": lost,
    }


def test_the_study_runs_on_the_worker_nodes_and_survives_losing_one(stack: Stack, study: dict):
    assert "job 'study' succeeded" in study["status"], study["logs"][-5000:]
    assert study["placed"] == ["stack_worker_1", "stack_worker_2"]
    lost = study["status_after_the_loss"]
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert re.search(r"^  worker-1 +DOWN ", lost.stdout, re.M), lost.stdout
    assert re.search(r"^  worker-2 +up ", lost.stdout, re.M), lost.stdout
    assert "| spatial/dupr " in study["logs"]  # the summary table

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name("stack").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("dupr.pipeline") == STUDY]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["dupr.stage"] for r in children} == {
        "pretrain",
        "convert/dupr",
        "spatial/dupr",
    }
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    (pretrain,) = [r for r in children if r.data.tags["dupr.stage"] == "pretrain"]
    assert int(pretrain.data.tags["dupr.resumed_at_step"]) > 0  # restarted after the node loss
    steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
    assert steps == list(range(1, 33))  # no gap, no duplicate

    # The runs are rows of the PostgreSQL database behind the server.
    import psycopg2

    pg = stack.services["postgres"]
    with psycopg2.connect(
        host="127.0.0.1", port=pg["port"], user="postgres", dbname="mlflow"
    ) as db:
        cur = db.cursor()
        cur.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (int(exp),))
        rows = dict(cur.fetchall())
    assert rows[parent.info.run_id] == "FINISHED" and pretrain.info.run_id in rows

    # Checkpoints and the MLflow artifacts (proxied by the server) are in the bucket.
    keys = list_keys(stack.s3, stack.bucket)
    assert any(k.endswith("checkpoint_epoch=0004/state.pt") for k in keys), keys[:50]
    artifacts = f"mlflow-artifacts/{exp}/{parent.info.run_id}/artifacts/"
    assert f"{artifacts}config/resolved.json" in keys
    assert any(k.startswith(artifacts) and k.endswith(".png") for k in keys)

    # The secret reached the services as their environment only: no file of the stack (state,
    # logs, every node's Ray session, the database) and no job log holds it.
    secret = stack.env["AWS_SECRET_ACCESS_KEY"]
    assert not files_holding(files_under(stack.root), secret)
    assert secret not in study["logs"] and secret not in stack.printed


CHROMIUM = "/usr/bin/chromium"  # Debian's (`make system-deps`); never a downloaded browser
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_the_study_in_the_mlflow_ui(stack: Stack, study: dict, tmp_path: Path):
    """As a person would: the experiment, the parent run and its nested stage runs, the loss
    chart of pre-training, the parent's IoU-similarity plot; a screenshot of each step."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run `make system-deps` (as root)"
    # A failed study has no plot to find: say so, rather than wait out the UI's timeouts.
    assert "job 'study' succeeded" in study["status"], "the study failed (see the test above)"
    shots = tmp_path / "screenshots"
    print(f"screenshots in {shots}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(90_000)  # the UI answers slowly on a loaded 2-core machine

            def shot(name: str) -> None:
                page.screenshot(path=shots / f"{name}.png")

            page.goto(f"{stack.mlflow}/#/experiments")
            page.get_by_text("Model training", exact=True).first.click()
            close = page.get_by_role("button", name="Close")  # the assistant's side panel
            if close.count():
                close.first.click()
            page.get_by_role("link", name="stack", exact=True).click()
            parent = page.get_by_role("link", name=STUDY, exact=True)
            parent.wait_for()
            # Expand the parent run: its stage runs are nested under it.
            page.locator("[role=gridcell]", has=parent).get_by_role("button").click()
            for name in study["stage_runs"].values():
                page.get_by_role("link", name=name, exact=True).wait_for()
            shot("1-runs")

            parent.click()
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("iou_similarity.png").first.click()
            plot = page.locator("img[src^='blob:']").first
            plot.wait_for()
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=plot.element_handle()
            )
            shot("2-plot-artifact")

            # Back to the runs, into the pre-training run: its loss chart.
            page.get_by_role("link", name="Runs", exact=True).first.click()
            parent.wait_for()
            pretrain = page.get_by_role("link", name=study["stage_runs"]["pretrain"], exact=True)
            try:  # the list may remember the expanded parent
                pretrain.wait_for(timeout=5_000)
            except PlaywrightTimeout:
                page.locator("[role=gridcell]", has=parent).get_by_role("button").click()
            pretrain.click()
            page.get_by_text("Model metrics", exact=True).first.click()
            page.get_by_placeholder("Search metric charts").fill("loss")
            chart = page.locator(".js-plotly-plot", has=page.locator(".js-line")).first
            chart.wait_for()  # a drawn line
            shot("3-loss-chart")
            legend = re.compile(rf"^{re.escape(study['stage_runs']['pretrain'])} \(loss")
            assert page.get_by_text(legend).first.is_visible()  # the run's curve, in a loss chart
        finally:
            browser.close()


def test_a_sweep_with_two_trials_at_once(stack: Stack, tmp_path: Path):
    """Two trials at once, each a pipeline whose pre-training logs every step: the MLflow
    server (PostgreSQL) under concurrent writers."""
    start = time.monotonic()
    grid = tmp_path / "two_taus.yaml"  # the head runs on this machine: it reads this path
    grid.write_text(yaml.safe_dump({"key": "pretrain.method.model.tau", "values": [0.1, 0.3]}))
    args = [
        *("--grid", str(grid), "sweep.name=stack-sweep", "sweep.max_concurrent_trials=2"),
        "stages=[pretrain]",
        f"storage=s3://{stack.bucket}/sweeps",
        f"tracking_uri={stack.mlflow}",
        "experiment=stack-sweep",
        f"pretrain.data={bundled_image_folder(16)}",
        *TOY_PIPELINE,
        "pretrain.method.optim.epochs=2",
    ]
    _submit(stack, "sweep", "pipelines/ablate.py", args)
    status, logs = _wait_end(stack, "sweep", 420)
    (tmp_path / "job.log").write_text(logs)
    print(f"sweep done after {time.monotonic() - start:.0f} s")
    assert "job 'sweep' succeeded" in status, logs[-5000:]
    rows = [line for line in logs.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 2 and all("| done |" in row for row in rows), rows

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name("stack-sweep").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    assert {r.info.status for r in runs} == {"FINISHED"}
    pretrains = [r for r in runs if r.data.tags.get("dupr.stage") == "pretrain"]
    assert len(pretrains) == 2
    for run in pretrains:  # 16 images, batch 8, 2 epochs: every step once
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == [1, 2, 3, 4], steps
    # The two pre-trainings wrote at the same time.
    a, b = (r.info for r in pretrains)
    assert a.start_time < b.end_time and b.start_time < a.end_time
    server_log = Path(stack.services["mlflow"]["log"]).read_text(errors="replace")
    assert "Traceback" not in server_log and " 500 " not in server_log, server_log[-3000:]
    # The sweep's state (Tune's and its stored rows) is in the bucket, signed with the keys;
    # Tune copied no key into its trials (Ray logs their runtime environments).
    keys = list_keys(stack.s3, stack.bucket, "sweeps/stack-sweep/")
    assert sum("/sweep/trials/" in k for k in keys) == 2 and any("/tune/" in k for k in keys)
    secret = stack.env["AWS_SECRET_ACCESS_KEY"]
    assert not files_holding(files_under(stack.root), secret)
    assert secret not in logs


def test_down_stops_exactly_what_up_started(stack: Stack, tmp_path: Path):
    """Every process group `up` and `add-worker` recorded is gone; a process whose command line
    names every service (what a kill by name would hit) still runs."""
    from dupr_platform.stack import _group

    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "ray", "raylet", "mlflow"]
        + ["moto", "postgres", str(stack.root)],
        start_new_session=True,
    )
    try:
        records = list(stack.services.values())
        assert any(_group(r) for r in records)
        start = time.monotonic()
        down = stack.cli("down")
        print(f"down in {time.monotonic() - start:.0f} s: {down.stdout}")
        assert down.returncode == 0, down.stderr
        assert not [r["name"] for r in records if _group(r)]
        assert bystander.poll() is None
        assert stack.cli("status").returncode == 1  # no stack any more
    finally:
        bystander.kill()
        bystander.wait()
