"""Real local services for integration tests: an S3-protocol server (moto) and an MLflow server.

Tests import the fixtures they use (``from services import s3_server, ...``). Each fixture
starts its own process or thread on 127.0.0.1 and stops exactly that one on teardown; nothing
global is changed except through ``monkeypatch``. Credentials here are fake test values.

Note: a session fixture imported into several test modules is instantiated once per module by
pytest; register the module in ``conftest.py`` (``pytest_plugins``) to share one instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from dupr_platform.ports import free_port, listening
from dupr_platform.stack import MLFLOW_SERVER_ENV

FAKE_KEY = "testing-key"
FAKE_SECRET = "testing-secret"
REGION = "us-east-1"
MLFLOW_BUCKET = "mlflow-artifacts"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str


@dataclass(frozen=True)
class IamS3Server:
    """A moto server that checks signatures and IAM policies (unlike the default one)."""

    endpoint_url: str
    bucket: str
    access_key: str  # user with s3:* on everything
    secret_key: str
    denied_access_key: str  # user with no policy at all
    denied_secret_key: str


@dataclass(frozen=True)
class RayHead:
    """A `ray start --head` on loopback with its own auth token (Ray 2.60's token auth)."""

    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit`
    gcs: str  # 127.0.0.1:PORT, for RAY_ADDRESS and `ray start --address`
    env: dict  # what a client needs: PATH with this venv, RAY_AUTH_MODE, RAY_AUTH_TOKEN
    temp_dir: str


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    s3_endpoint_url: str
    artifact_bucket: str
    log_path: Path


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


class OutageClient:
    """An MlflowClient during an outage: its calls go to a port with nothing on it (MLflow's
    real error for a server that cannot be reached) until `back` is set, then to `live`."""

    def __init__(self, live: Any, back: threading.Event) -> None:
        from mlflow.tracking import MlflowClient

        self.live, self.back = live, back
        self.down = MlflowClient(f"http://127.0.0.1:{free_port()}")

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: getattr(self.live if self.back.is_set() else self.down, name)(
            *a, **kw
        )


def s3_client(endpoint: str, key: str = FAKE_KEY, secret: str = FAKE_SECRET, service: str = "s3"):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=REGION,
    )


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket (a fresh unique one by default) and return its name."""
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = (
        s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's threaded S3 server in this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """Fake credentials and the moto endpoint in this test's environment."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return s3_server


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req, timeout=10).read()


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} not up after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group this fixture created (the server and its workers) and reap it.

    SIGTERM first; what still runs after 5 s is killed: `ray start --block` took the whole
    former 20 s grace on every teardown, and these servers hold nothing a test reads later."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


def _clean_env() -> dict[str, str]:
    """This environment minus AWS/MLflow settings, so a server only sees what we give it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "MOTO_"))}


@pytest.fixture(scope="session")
def s3_iam_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3Server]:
    """A separate moto process with IAM authentication on (wrong keys are rejected).

    moto checks credentials only when ``INITIAL_NO_AUTH_ACTION_COUNT`` is finite; that setting
    is process-global, so this server runs in its own process to leave ``s3_server`` alone.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto-iam") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=_clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"{endpoint}/moto-api/", proc, 30, log_path)
        bucket = make_bucket(endpoint)
        iam = s3_client(endpoint, service="iam")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.create_user(UserName="writer")
        iam.put_user_policy(
            UserName="writer", PolicyName="s3-all", PolicyDocument=json.dumps(policy)
        )
        good = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.create_user(UserName="nobody")
        denied = iam.create_access_key(UserName="nobody")["AccessKey"]
        _post(f"{endpoint}/moto-api/reset-auth", b"0")  # from now on every request is checked
        yield IamS3Server(
            endpoint_url=endpoint,
            bucket=bucket,
            access_key=good["AccessKeyId"],
            secret_key=good["SecretAccessKey"],
            denied_access_key=denied["AccessKeyId"],
            denied_secret_key=denied["SecretAccessKey"],
        )
    finally:
        _stop(proc)


def start_mlflow_server(
    workdir: Path, port: int, artifacts: str, env: dict[str, str], timeout_s: float
) -> subprocess.Popen:
    """`mlflow server` on `port` over the SQLite store in `workdir` (its log there too, added
    to by a restart); up when this returns. Stop it with `_stop`."""
    log_path = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
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
            env=env | MLFLOW_SERVER_ENV,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout_s, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` as a real process: sqlite backend, artifacts proxied to moto S3.

    Only the server gets S3 credentials and the endpoint; clients talk HTTP to it.
    """
    make_bucket(s3_server.endpoint_url, MLFLOW_BUCKET)
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = _clean_env() | {
        "AWS_ACCESS_KEY_ID": FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
    }
    proc = start_mlflow_server(workdir, port, f"s3://{MLFLOW_BUCKET}/", env, 90)
    try:
        yield MlflowServer(
            uri=f"http://127.0.0.1:{port}",
            s3_endpoint_url=s3_server.endpoint_url,
            artifact_bucket=MLFLOW_BUCKET,
            log_path=workdir / "server.log",
        )
    finally:
        _stop(proc)


BIN = Path(sys.executable).parent


def _ray_start(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head node process on loopback (2 CPUs), stopped through its process group.

    The test gives head and clients its own token through RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN, so it neither reads nor writes the user's ~/.ray/auth_token.
    """
    token = uuid.uuid4().hex
    port, dashboard, agent = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the head resolves `python`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    }
    # A short temp dir: Ray's Unix socket paths must stay under ~100 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayh")
    log_path = tmp_path_factory.mktemp("ray-head") / "head.log"
    head = _ray_start(
        [
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # The job agent's own port (Ray's default, 52365, is shared by every Ray instance on
            # the machine: one that finds it taken serves no jobs: "No available agent").
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env,
        log_path,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # up once its job agent listens (`ray job submit` needs it) and jobs list
            probe = listening(agent) and subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if probe and probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(2)
        yield RayHead(address, f"127.0.0.1:{port}", env, temp_dir)
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)  # its session logs: read by then


@contextlib.contextmanager
def ray_worker_node(
    head: RayHead, env: dict, log_path: Path, num_cpus: int = 1
) -> Iterator[subprocess.Popen]:
    """Another node of `head`'s cluster, started with `env`; stopped through its group.
    Yields its `ray start` process, the leader of that group (the node's raylet and workers).

    Its own temp dir, as on a machine of its own: nodes that share one also share the session's
    log folder, and each node's log monitor then forwards every worker's output (and a node that
    joins later replays it from the start)."""
    temp_dir = tempfile.mkdtemp(prefix="rayw")
    node = _ray_start(
        [
            f"--address={head.gcs}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",  # not the head's (ray_head)
        ],
        env,
        log_path,
    )
    try:
        yield node
    finally:
        _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
