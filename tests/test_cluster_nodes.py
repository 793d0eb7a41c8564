"""The main job on a cluster of `ray start` processes, connected through RAY_ADDRESS.

- A node without credentials is found in preflight, by the variable's name. Credentials never
  travel through Ray: every node brings its own. A head with the credentials and a second node
  without meet an S3 server that checks signatures; the job must stop before anything is
  scheduled, with one line naming the node and the missing variables, never their values.
- A task or training worker that asks more than any one node has (though the cluster's total
  has it) would wait forever: preflight names the setting, exit status 2.
- A node lost during a detection fine-tuning, with none to replace it: the stage waits
  `eval.node_wait_minutes` for one, then fails; once a node joins, the rerun resumes it.
- A node lost during a pre-training, with none to replace it: Ray Train waits
  `pretrain.worker_group_start_minutes` for one, then the job ends with one line; once a node
  joins, the same command resumes from the latest checkpoint.
- A node lost during a detection fine-tuning: the driver launches the stage again, it waits
  for a node that fits it (a replacement joins), and resumes from its latest checkpoint; the
  killed stage's scratch folder on the node's disk is removed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import ray
from mlflow.tracking import MlflowClient

from drivers import PIPELINE, Driver, files_under, run
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import ray_worker_node

# Starts a `ray start` head and a second node, and a driver process.
pytestmark = pytest.mark.slow

COUNT_NODES = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"


def _nodes_up(head, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [sys.executable, "-c", COUNT_NODES],
            env={**head.env, "RAY_ADDRESS": head.gcs},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.stdout.strip().endswith(str(count)):
            return
        time.sleep(2)
    raise AssertionError("the second node did not join")


def _pipeline(tmp_path, *extra: str) -> list[str]:
    """The main job at toy scale, with its storage and MLflow store in tmp_path."""
    return [
        PIPELINE,
        f"storage={tmp_path / 'storage'}",
        f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"pretrain.data={bundled_image_folder(64)}",
        *TOY_PIPELINE,
        *extra,
    ]


def _fine_tuning_on_the_node(tmp_path, iterations: int, *extra: str) -> list[str]:
    """Pre-train, convert, then a fine-tuning of `iterations` that asks for 3 CPUs, which only
    the worker node has (the head has 2), and checkpoints every 3 s."""
    return _pipeline(
        tmp_path,
        "baselines.random=false",
        "stages=[pretrain,convert,detection]",
        "eval.resources.cpus=3",
        f"eval.detection.iterations={iterations}",
        "eval.detection.checkpoint_minutes=0.05",
        "eval.detection.log_every=1",
        *extra,
    )


def _node_env(ray_head, tmp_path) -> dict[str, str]:
    """A worker node's environment: its temp folder on the disk that a node replacing it on the
    same machine finds (where the killed workers' scratch folders are left)."""
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir(exist_ok=True)
    return {**ray_head.env, "TMPDIR": str(node_tmp)}


def _lose_its_node(ray_head, tmp_path, args: list[str], ready, what: str) -> tuple[int, str, float]:
    """Run `args` on the head and a 3-CPU node; kill that node (its `ray start`, raylet and
    workers) once `ready()`, and let no node replace it. (exit status, console output,
    seconds from the kill to the driver's end)."""
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
    driver = None
    try:
        with ray_worker_node(
            ray_head, _node_env(ray_head, tmp_path), tmp_path / "lost.log", 3
        ) as lost:
            _nodes_up(ray_head, 2)
            driver = Driver(args, tmp_path / "first.txt", env=env)
            driver.wait_for(ready, 400, what)
            os.killpg(lost.pid, signal.SIGKILL)
            lost.wait(timeout=30)
            lost_at = time.monotonic()
        status = driver.wait(300)
        waited = time.monotonic() - lost_at
    finally:
        if driver is not None:
            driver.stop()
    return status, driver.output(), waited


def _rerun_on_a_new_node(ray_head, tmp_path, args: list[str]) -> tuple[int, str]:
    """The same command again, once a 3-CPU node has joined: (exit status, console output)."""
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
    with ray_worker_node(ray_head, _node_env(ray_head, tmp_path), tmp_path / "replacement.log", 3):
        _nodes_up(ray_head, 2)
        return run(args, tmp_path / "second.txt", timeout=400, env=env)


def test_a_node_without_credentials_fails_preflight(ray_head, s3_iam_server, tmp_path):
    assert not ray.is_initialized()
    settings = {"AWS_ENDPOINT_URL": s3_iam_server.endpoint_url, "AWS_REGION": "us-east-1"}
    bare = {k: v for k, v in ray_head.env.items() if not k.startswith("AWS_")}
    node_env = {**bare, **settings, "AWS_EC2_METADATA_DISABLED": "true"}
    with ray_worker_node(ray_head, node_env, tmp_path / "node.log"):
        _nodes_up(ray_head, 2)
        driver_env = {
            **ray_head.env,
            **settings,
            "RAY_ADDRESS": ray_head.gcs,
            "AWS_ACCESS_KEY_ID": s3_iam_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_iam_server.secret_key,
        }
        args = [
            PIPELINE,
            f"storage=s3://{s3_iam_server.bucket}/runs",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *TOY_PIPELINE,
        ]
        status, output = run(args, tmp_path / "out.txt", timeout=300, env=driver_env)
    lines = [line for line in output.splitlines() if line.strip() and "Ray's own" not in line]
    assert status == 2, output[-4000:]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: node ") and f"storage 's3://{s3_iam_server.bucket}/runs'" in line
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY set here but not on that node" in line
    assert s3_iam_server.secret_key not in output and s3_iam_server.access_key not in output


def test_what_no_single_node_has_fails_preflight(ray_head, tmp_path):
    """Two nodes of 2 CPUs: 4 in all, but a stage or a training worker asking 3 fits none."""
    base = _pipeline(tmp_path)
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
    expected = {
        "eval.resources.cpus=3": "error: eval.resources: stage spatial/dupr needs 3 CPU on one "
        "node, the Ray cluster's largest node has 2",
        "pretrain.cpus_per_worker=3": "error: pretrain.cpus_per_worker=3: needs 3 CPUs on one "
        "node, the Ray cluster's largest node has 2",
    }
    with ray_worker_node(ray_head, ray_head.env, tmp_path / "node.log", num_cpus=2):
        _nodes_up(ray_head, 2)
        for i, (setting, line) in enumerate(expected.items()):
            status, output = run([*base, setting], tmp_path / f"{i}.txt", timeout=300, env=env)
            shown = [x for x in output.splitlines() if x.strip() and "Ray's own" not in x]
            assert status == 2 and shown == [line], output[-4000:]
    assert not files_under(tmp_path / "storage")  # nothing ran (preflight's probe is gone)


def test_an_evaluation_whose_node_dies_resumes_on_another(ray_head, tmp_path):
    """The fine-tuning asks for 3 CPUs, which only the worker node has (the head has 2): its
    node is killed (the whole process group of its `ray start`: raylet and workers) once the
    fine-tuning has checkpointed, and a replacement node joins, as an autoscaler would add it."""
    storage, tracking = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _fine_tuning_on_the_node(tmp_path, 24)
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}
    resume_state = "stages/detection-*/resume/finetune.pt"
    waits = "detection/faster_rcnn_fpn/dupr: waits for a node with 3 CPU (no node of the"
    node_env, node_tmp = _node_env(ray_head, tmp_path), tmp_path / "node-tmp"
    driver = None
    try:
        with ray_worker_node(ray_head, node_env, tmp_path / "lost.log", num_cpus=3) as lost:
            _nodes_up(ray_head, 2)
            driver = Driver(args, tmp_path / "driver.txt", env=env)
            driver.wait_for(lambda: any(storage.glob(resume_state)), 400, "a checkpoint")
            os.killpg(lost.pid, signal.SIGKILL)
            lost.wait(timeout=30)
        # The killed stage's scratch folder is left behind, for the next stage there to remove.
        assert list(node_tmp.glob("dupr-scratch-stage-*"))
        # Relaunched, the stage waits: no node left has 3 CPUs, and the console says so.
        driver.wait_for(lambda: waits in driver.output(), 120, "the waiting stage's line")
        with ray_worker_node(ray_head, node_env, tmp_path / "replacement.log", num_cpus=3):
            status = driver.wait(400)
    finally:
        if driver is not None:
            driver.stop()
    output = driver.output()
    assert status == 0, output[-4000:]
    # Ray says NodeDiedError, or WorkerCrashedError where the worker's loss was noticed first.
    lost_line = r"detection/\S+/dupr: lost its worker \((NodeDiedError|WorkerCrashedError): "
    (relaunched,) = [line for line in output.splitlines() if re.search(lost_line, line)]
    assert relaunched.endswith("launched again (1 of 3)")
    assert len(relaunched) < 300, relaunched  # what and where; Ray's how-to stays in its log
    assert output.index(relaunched) < output.index(waits), output[-4000:]
    # Each line once: a node that joins does not replay what the others' workers printed.
    shown = [line for line in output.splitlines() if line.startswith("[")]
    assert len(shown) == len(set(shown)), output[-4000:]
    resumed = re.findall(r"resuming the fine-tuning after iteration (\d+)", output)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 24, output[-4000:]
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("dupr").experiment_id])
    (detection,) = [r for r in runs if r.data.tags.get("dupr.stage", "").startswith("detection")]
    assert detection.info.status == "FINISHED"
    assert detection.data.tags["dupr.stage_attempt"] == "2"
    history = client.get_metric_history(detection.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 25))  # none lost, none twice
    assert not list(node_tmp.glob("dupr-*"))  # the orphan went with the resumed stage


def test_an_evaluation_whose_node_is_not_replaced_fails_then_resumes(ray_head, tmp_path):
    """As above, but no node joins while the relaunched fine-tuning waits: after
    eval.node_wait_minutes (6 s here, 15 min by default) it fails, the job ends, and once a node
    joins the same command resumes the fine-tuning from its checkpoint."""
    storage, tracking = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _fine_tuning_on_the_node(tmp_path, 12, "eval.node_wait_minutes=0.1")
    resume_state = "stages/detection-*/resume/finetune.pt"
    status, output, waited = _lose_its_node(
        ray_head, tmp_path, args, lambda: any(storage.glob(resume_state)), "a checkpoint"
    )
    assert status == 1, output[-4000:]
    failed = (
        "[pipeline] detection/faster_rcnn_fpn/dupr: FAILED: NodeWaitTimeout: no node with 3 CPU "
        "joined within 0.1 min (eval.node_wait_minutes)"
    )
    assert failed in output.splitlines(), output[-4000:]
    assert "Traceback" not in output
    # The relaunch, a check every 10 s that sees it wait, the 6 s, and the next check.
    assert waited < 60, waited

    status, output = _rerun_on_a_new_node(ray_head, tmp_path, args)
    assert status == 0, output[-4000:]
    resumed = re.findall(r"resuming the fine-tuning after iteration (\d+)", output)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 12, output[-4000:]
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("dupr").experiment_id])
    (detection,) = [
        r
        for r in runs
        if r.data.tags.get("dupr.stage", "").startswith("detection")
        and r.data.tags.get("dupr.cache_hit") == "false"
    ]
    assert detection.info.status == "FINISHED"
    history = client.get_metric_history(detection.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))  # none lost, none twice


def test_a_pretraining_whose_node_is_not_replaced_fails_then_resumes(ray_head, tmp_path):
    """The training worker asks for 3 CPUs, which only the worker node has; that node is killed
    after the first checkpoint. Ray Train waits 6 s (not its default minute) for a node, once
    (controller_failure_limit=0); then a node joins and the rerun continues the run."""
    storage, tracking = tmp_path / "storage", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _pipeline(
        tmp_path,
        "stages=[pretrain]",
        "baselines.random=false",
        "pretrain.method.optim.epochs=4",
        "pretrain.cpus_per_worker=3",
        "pretrain.controller_failure_limit=0",
        "pretrain.worker_group_start_minutes=0.1",
    )
    snapshot = "**/checkpoint_manager_snapshot.json"
    status, output, waited = _lose_its_node(
        ray_head,
        tmp_path,
        args,
        lambda: any("checkpoint_epoch=" in p.read_text() for p in storage.glob(snapshot)),
        "a checkpoint",
    )
    assert status == 1, output[-4000:]
    # Ray Train starts the group again once, and either of its start failures ends the run: no
    # node fits and it waits the 6 s; or, when Ray has not yet marked the lost node dead, a
    # worker is placed there and fails to initialize. Which one comes depends on the load.
    failed = [
        line for line in output.splitlines() if line.startswith("[pipeline] pretrain: FAILED")
    ]
    causes = (
        "The worker group startup timed out after 6.0 s",
        "worker actors failed to initialize",
    )
    assert len(failed) == 1 and any(cause in failed[0] for cause in causes), output[-6000:]
    assert "Traceback" not in output
    assert waited < 50, waited  # Ray's own default would have waited a minute
    # The killed worker's checkpoint scratch folder, left behind.
    assert list((tmp_path / "node-tmp").glob("dupr-scratch-checkpoints-*"))

    status, output = _rerun_on_a_new_node(ray_head, tmp_path, args)
    assert status == 0, output[-4000:]
    assert not list((tmp_path / "node-tmp").glob("dupr-*"))  # removed by the rerun's worker
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("dupr").experiment_id])
    (pretrain,) = [r for r in runs if r.data.tags.get("dupr.stage") == "pretrain"]
    assert pretrain.info.status == "FINISHED"
    assert int(pretrain.data.tags["dupr.resumed_at_step"]) > 0
    steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
    assert steps == list(range(1, 33))  # no gap, no duplicate
