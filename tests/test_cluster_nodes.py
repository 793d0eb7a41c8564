"""A cluster node without credentials is found in preflight, by the variable's name.

Credentials never travel through Ray: every node brings its own. Here a two-node cluster of
`ray start` processes (a head with the credentials, a second node without) meets an S3 server
that checks signatures; the main job, connected through RAY_ADDRESS, must stop before anything
is scheduled, with one line naming the node and the missing variables, never their values.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import ray

from drivers import PIPELINE, run
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
