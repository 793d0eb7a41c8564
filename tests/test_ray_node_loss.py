"""Fault tolerance: a node that hosts a training worker dies mid-run; the run still finishes.

A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), storage on the S3 server,
tracking on the MLflow server. The head has no CPUs, so both training workers live on the two
worker nodes; one of them is removed without grace after the first registered checkpoint and a fresh node
joins. Ray restarts the worker group, the workers restore the latest checkpoint, and the MLflow
run ends with every step logged exactly once.
"""

import threading
import time

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from dupr.data import bundled_image_folder
from dupr_platform.ray_pretrain import run_pretraining
from helpers import tiny_job
from services import list_keys, make_bucket, s3_client

# Starts a 3-node ray.cluster_utils.Cluster, an S3 and an MLflow server.
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(monkeypatch, s3_env):
    """The nodes start with the (fake) credentials in their environment, as cluster nodes have
    their own: the platform never hands credentials to Ray."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield c
    ray.shutdown()
    c.shutdown()  # stops only the nodes this test started


def test_run_survives_the_loss_of_a_worker_node(cluster, s3_env, s3_server, mlflow_server):
    victim = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    bucket = make_bucket(s3_server.endpoint_url, "node-loss")
    job = tiny_job("node-loss", f"s3://{bucket}/runs", mlflow_server.uri, epochs=4)
    job.data = str(bundled_image_folder(48))  # 6 steps per epoch

    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=run_pretraining(job)), daemon=True)
    fit.start()
    # Wait until Ray has *registered* the first checkpoint (its snapshot names it), not just
    # until the files are uploaded: an unregistered checkpoint is rightly not resumed from.
    s3 = s3_client(s3_server.endpoint_url)
    snapshot = "runs/node-loss/checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if snapshot in list_keys(s3_server.endpoint_url, bucket, "runs/"):
            body = s3.get_object(Bucket=bucket, Key=snapshot)["Body"].read()
            if b"checkpoint_epoch=0001" in body:
                break
        time.sleep(0.2)
    assert time.time() < deadline, "no first checkpoint"
    cluster.remove_node(victim, allow_graceful=False)  # node loss, mid-run
    cluster.add_node(num_cpus=1)  # the replacement (from the main thread, as Ray requires)
    fit.join(timeout=600)
    assert not fit.is_alive() and "result" in outcome, "the run did not finish"

    result = outcome["result"]
    assert (result.epochs, result.steps) == (4, 24)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dupr.resumed_at_step"] in ("6", "12", "18")  # restarted
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert sorted(steps) == list(range(1, 25))  # no gaps, no duplicates
    assert "runs/node-loss/checkpoint_epoch=0004/state.pt" in list_keys(
        s3_server.endpoint_url, bucket, "runs/"
    )
