"""The object store goes away mid-run: one clear line, soon, and a resume once it is back.

The S3 server (moto, in this test's process, on a fixed port) is stopped after the first
pre-training checkpoint. The main job must end with one line that names the storage endpoint
and the last complete checkpoint, without Ray's worker-group restarts (`max_failures`), in
bounded time. With the same server back on the same port (its buckets kept), the same command
resumes from that checkpoint and completes.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer

from drivers import PIPELINE, Driver, run
from dupr.data import bundled_image_folder
from helpers import TOY_PIPELINE
from services import free_port, list_keys, make_bucket, s3_client

# Starts an S3 (moto) server of its own and driver processes that start Ray.
pytestmark = pytest.mark.slow


def _serve(port: int) -> ThreadedMotoServer:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def test_storage_outage_fails_once_then_resumes(tmp_path):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _serve(port)
    try:
        bucket = make_bucket(endpoint)
        env = {
            "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        args = [
            PIPELINE,
            f"storage=s3://{bucket}/runs",
            f"tracking_uri={tracking}",
            "experiment=outage",
            f"pretrain.data={bundled_image_folder(64)}",
            *TOY_PIPELINE,
            "pretrain.method.optim.epochs=4",
            "pretrain.max_failures=3",
            "stages=[pretrain]",
            "baselines.random=false",
        ]

        s3 = s3_client(endpoint)

        def checkpointed() -> bool:
            """Ray Train has recorded the first checkpoint (its snapshot names it)."""
            for key in list_keys(endpoint, bucket, "runs/stages/"):
                if key.endswith("checkpoint_manager_snapshot.json"):
                    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                    return b"checkpoint_epoch=0001" in body
            return False

        driver = Driver(args, tmp_path / "first.txt", env=env)
        driver.wait_for(checkpointed, 300, "first checkpoint in S3")
        server.stop()
        down = time.monotonic()
        status = driver.wait(timeout=300)
        took = time.monotonic() - down
        driver.stop()
        output = driver.output()
        assert status == 1, output[-4000:]
        failed = [line for line in output.splitlines() if "pretrain: FAILED" in line]
        assert len(failed) == 1, output[-4000:]
        assert endpoint in failed[0] and "unreachable" in failed[0]
        assert "last complete checkpoint: s3://" in failed[0]
        assert "checkpoint_epoch=000" in failed[0]
        assert "Traceback" not in output
        assert took < 150, f"the failure took {took:.0f}s to surface"
        print(f"storage outage: failed {took:.1f}s after the store went down")
        # One attempt: Ray Train started the worker group once, not max_failures more times.
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert logs.count("Started training worker group") == 1

        server = _serve(port)  # the same store is back (moto keeps its state in this process)
        status, output = run(args, tmp_path / "second.txt", timeout=600, env=env)
        assert status == 0, output[-4000:]
        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name("outage").experiment_id
        pretrain = client.search_runs([exp], "tags.`dupr.stage` = 'pretrain'")[0]
        assert pretrain.info.status == "FINISHED"
        assert int(pretrain.data.tags["dupr.resumed_at_step"]) >= 8
        steps = sorted(m.step for m in client.get_metric_history(pretrain.info.run_id, "loss"))
        assert steps == list(range(1, 33))
    finally:
        server.stop()


def test_the_failure_line_names_the_checkpoint_ray_recorded_while_storage_is_down(local_ray):
    """Ray's record of its checkpoints is a file in the storage that is down, so the driver
    names the checkpoint that the controller's callback saw recorded (its ledger), not
    "none". A controller error (Ray failing to write its own state) takes this path."""
    import ray.train

    from dupr_platform.failures import CheckpointLedger, StopOnUnrecoverable
    from dupr_platform.ray_pretrain import _ledger_latest, failure_message
    from dupr_platform.storage import open_storage

    ledger = CheckpointLedger.remote(None)
    callback = StopOnUnrecoverable(None, "s3://", ledger=ledger)
    callback.after_report(None, [{}], None)  # a report without a checkpoint changes nothing
    recorded = SimpleNamespace(path="bucket/runs/stages/pretrain-x/checkpoint_epoch=0001")
    callback.after_report(None, [{}], recorded)

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = open_storage("s3://bucket/runs/stages", endpoint_url=endpoint)
    error = ray.train.ControllerError(OSError("When uploading the run state: failed"))
    line = failure_message(error, storage, "pretrain-x", _ledger_latest(ledger))
    assert "unreachable" in line and endpoint in line
    assert (
        "last complete checkpoint: s3://bucket/runs/stages/pretrain-x/checkpoint_epoch=0001" in line
    )
