"""A local multi-node stack without containers, for trying the cluster path on one machine.

    python -m dupr_platform.stack up [--dir runs/stack]   # start it, print endpoints and exports
    python -m dupr_platform.stack status                  # what runs, exit status 1 if not all
    python -m dupr_platform.stack add-worker              # one more worker node (a replacement)
    python -m dupr_platform.stack down                    # stop exactly what `up` started

Each on a free port of this machine: PostgreSQL (Debian's `postgresql`) as the MLflow server's
backend store, moto's S3 server with one bucket, the MLflow server with artifacts proxied to
that bucket, a Ray head (no CPUs: it runs the job drivers, as on a cluster) and two worker
nodes as separate `ray start` processes, each with a custom resource naming it
(`stack_worker_1`, ...) so a test can tell where Ray placed what. PostgreSQL, S3, MLflow and
Ray's dashboard listen on 127.0.0.1 only; Ray's node processes listen on every interface and
advertise the host's address whatever `--node-ip-address` says (Ray maps 127.0.0.1 to it), so
the stack runs them with token authentication on.

Why this shape: it is the Compose stack of `deploy/compose/` without containers (this project's
machines have no container engine), so the multi-node path (job submission, token auth,
credentials on every node, node loss, PostgreSQL under concurrent writers) runs for real.

Needs the `test` extra (moto, psycopg2-binary; `make venv` installs it) and Debian's
`postgresql` (`make system-deps`).

Secrets come from the environment of `up` and `add-worker` (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`: any values, moto accepts them; `RAY_AUTH_TOKEN`: Ray's token) and
reach the services only as their environment, like a cluster node's own: never a command
line, a file of the stack, a Ray runtime environment or a log. The state file
(`<dir>/stack.json`) records pids, process groups, ports and the names of those variables.
`down` stops the process groups it recorded (checking each leader's start time, so a reused
pid is left alone); it never runs `ray stop` and never matches processes by name.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dupr_platform.ports import free_port, listening

SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")
STATE = "stack.json"
REGION = "us-east-1"
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
# The platform runs no MLflow server jobs (MLflow's GenAI judges and trace roll-ups): without
# them the server starts no job runner and no Huey consumers, eight processes fewer that took
# about 35 s of CPU per start on 2 cores and kept polling after.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
# The processes' settings that are not secrets and that `up` must not hand on by accident.
_DROPPED = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class StackError(RuntimeError):
    """Something the user can fix (a missing variable, a stack already up); one line."""


# --------------------------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(process group, start time in clock ticks since boot) of a live process, else None.

    Read from /proc (the stack runs on Linux): a zombie counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (int(fields[2]), int(fields[19]))


def _spawn(
    name: str, cmd: list[str], env: dict[str, str], log: Path, **kwargs: Any
) -> dict[str, Any]:
    """Start `cmd` as the leader of a new process group; its record for the state file."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    stat = _proc_stat(proc.pid)
    return {"name": name, "pid": proc.pid, "started": stat[1] if stat else 0, "log": str(log)}


def _alive(record: dict[str, Any]) -> bool:
    """Whether the recorded process still runs (same pid and start time)."""
    return _proc_stat(record["pid"]) == (record["pid"], record["started"])


def _group(record: dict[str, Any]) -> list[int]:
    """The live processes of the recorded process group started since its leader was."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] == record["pid"] and stat[1] >= record["started"]:
                found.append(int(entry.name))
    return found


def stop(record: dict[str, Any], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop one recorded process group: `sig` to its members, SIGKILL after `timeout`.

    Only processes of that group started since the recorded leader are signalled, so a pid or
    group id that someone else got since is left alone.
    """
    for signum, wait_s in ((sig, timeout), (signal.SIGKILL, 10.0)):
        members = _group(record)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait_s
        while _group(record) and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait(what: str, ready: Any, record: dict[str, Any], timeout: float) -> None:
    """Poll `ready()` until true; fail with the log's tail if the process dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(record):
            raise StackError(f"{what} exited; its log:\n{_tail(record['log'])}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.5)
    raise StackError(f"{what} not up after {timeout:.0f} s; its log:\n{_tail(record['log'])}")


def _tail(log: str, chars: int = 3000) -> str:
    return Path(log).read_text(errors="replace")[-chars:] if Path(log).exists() else ""


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return resp.status == 200


# --------------------------------------------------------------------------------------------
# Services


def _base_env() -> dict[str, str]:
    """This environment without settings that would point the services elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` of a job is this venv's
    return env


def _secrets() -> dict[str, str]:
    missing = [name for name in SECRETS if not os.environ.get(name)]
    if missing:
        raise StackError(
            f"set {', '.join(missing)} in the environment first (any AWS key values work with "
            "the stack's S3 server; a token: export RAY_AUTH_TOKEN=$(openssl rand -hex 32))"
        )
    return {name: os.environ[name] for name in SECRETS}


def _pg_bin() -> Path:
    """PostgreSQL's server binaries: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not versions:
        raise StackError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(versions[-1]).parent


def _pg_user() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "running as root needs the `postgres` user (apt-get install postgresql)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _node_env(s3: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """A Ray node's own environment: its credentials, the S3 endpoint, token auth."""
    return (
        _base_env()
        | secrets
        | {"AWS_ENDPOINT_URL": s3["endpoint"], "AWS_REGION": REGION, "RAY_AUTH_MODE": "token"}
    )


def _ray_temp(root: Path) -> Path:
    """Ray's temp root, one folder per node in it: under --dir when short enough (Unix socket
    paths stay under ~107 characters with Ray's session and socket names after it), else a
    short one in /tmp. Nodes sharing one folder race for the same socket names."""
    candidate = root / "ray"
    if len(str(candidate)) <= 36:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate
    return Path(tempfile.mkdtemp(prefix="dupr-stack-"))


# Every port a Ray node opens that has a fixed default: several nodes share this host.
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def _ray_ports(*names: str) -> dict[str, int]:
    return {name: free_port() for name in names}


def _flags(ports: dict[str, int]) -> list[str]:
    return [f"--{name}={port}" for name, port in ports.items()]


class Stack:
    """The stack in one directory: its state file, logs, and the services it started."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.logs = self.root / "logs"
        self.path = self.root / STATE
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.state.setdefault("services", {})

    def running(self) -> list[str]:
        return [name for name, rec in self.services.items() if _alive(rec)]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], **kw: Any) -> dict[str, Any]:
        """Start a service and record it at once, so that `down` finds it whatever follows."""
        record = _spawn(name, cmd, env, self.logs / f"{name}.log", **kw)
        self.services[name] = record
        self.save()
        return record

    def update(self, name: str, **values: Any) -> dict[str, Any]:
        self.services[name].update(values)
        self.save()
        return self.services[name]

    # The services, in the order `up` starts them.

    def start_s3(self, bucket: str, secrets: dict[str, str]) -> dict[str, Any]:
        """moto's S3 server (objects in its memory) and the bucket."""
        import boto3

        port = free_port()
        env = {k: v for k, v in _base_env().items() if not k.startswith("AWS_")}
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
        record = self.spawn("s3", cmd, env)
        endpoint = f"http://{HOST}:{port}"
        _wait("the S3 server", lambda: _http_ok(f"{endpoint}/moto-api/"), record, 60)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=secrets["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=secrets["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=bucket)
        return self.update("s3", port=port, endpoint=endpoint, bucket=bucket)

    def start_postgres(self) -> dict[str, Any]:
        """PostgreSQL with a database `mlflow`, trust authentication on loopback only. Its
        data stays in --dir between `down` and the next `up`."""
        pg_bin, as_user = _pg_bin(), _pg_user()
        data = self.root / "postgres"
        if not (data / "PG_VERSION").exists():
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            if as_user:
                os.chown(data, as_user["user"], as_user["group"])
            init = subprocess.run(
                [str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
                capture_output=True,
                text=True,
                **as_user,
            )
            if init.returncode:
                hint = " (the postgres user must be able to reach --dir)" if as_user else ""
                raise StackError(f"initdb failed{hint}: {init.stderr.strip()[-800:]}")
        port = free_port()
        cmd = [
            str(pg_bin / "postgres"),
            *("-D", str(data), "-p", str(port), "-k", str(data)),
            *("-c", f"listen_addresses={HOST}", "-c", "max_connections=200"),
        ]
        record = self.spawn("postgres", cmd, _base_env(), **as_user)
        ready = [str(pg_bin / "pg_isready"), "-q", "-h", HOST, "-p", str(port)]
        _wait("PostgreSQL", lambda: subprocess.run(ready).returncode == 0, record, 60)
        made = subprocess.run(
            [str(pg_bin / "createdb"), "-h", HOST, "-p", str(port), "-U", "postgres", "mlflow"],
            capture_output=True,
            text=True,
        )
        if made.returncode and "already exists" not in made.stderr:
            raise StackError(f"createdb failed: {made.stderr.strip()}")
        uri = f"postgresql+psycopg2://postgres@{HOST}:{port}/mlflow"
        return self.update("postgres", port=port, data=str(data), uri=uri)

    def start_mlflow(self, secrets: dict[str, str], workers: int = 2) -> dict[str, Any]:
        """The MLflow server: runs in PostgreSQL, artifacts proxied to the bucket, so MLflow's
        clients need no S3 credentials."""
        s3, port = self.services["s3"], free_port()
        env = _base_env() | {
            "AWS_ACCESS_KEY_ID": secrets["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": secrets["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
            **MLFLOW_SERVER_ENV,
        }
        cmd = [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", self.services["postgres"]["uri"]),
            *("--artifacts-destination", f"s3://{s3['bucket']}/mlflow-artifacts"),
            *("--host", HOST, "--port", str(port), "--workers", str(workers)),
        ]
        record = self.spawn("mlflow", cmd, env, cwd=self.logs)
        uri = f"http://{HOST}:{port}"
        _wait("the MLflow server", lambda: _http_ok(f"{uri}/health"), record, 240)
        return self.update("mlflow", port=port, uri=uri)

    def start_head(self, secrets: dict[str, str]) -> dict[str, Any]:
        port, dashboard = free_port(), free_port()
        ports = _ray_ports("ray-client-server-port", *_NODE_PORTS)
        temp = _ray_temp(self.root)
        self.state["ray_temp"] = str(temp)
        cmd = [
            *(str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats"),
            *(f"--port={port}", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard}"),
            *_flags(ports),
            # No CPUs: the head runs the GCS, the dashboard and the job drivers, as on a
            # cluster; training and evaluation go to the worker nodes.
            *("--num-cpus=0", '--resources={"stack_head": 1}', f"--temp-dir={temp / 'head'}"),
            "--object-store-memory=300000000",
        ]
        record = self.spawn("ray-head", cmd, _node_env(self.services["s3"], secrets))
        gcs, url = f"{HOST}:{port}", f"http://{HOST}:{dashboard}"
        # Up once its job agent listens too: `ray job submit` before that gets Ray's "No
        # available agent to submit job" (the agent starts after the dashboard).
        agent = ports["dashboard-agent-listen-port"]
        _wait(
            "the Ray head",
            lambda: listening(port, HOST) and _http_ok(url) and listening(agent, HOST),
            record,
            120,
        )
        return self.update(
            "ray-head", gcs=gcs, dashboard=url, node_manager_port=ports["node-manager-port"]
        )

    def start_worker(self, secrets: dict[str, str], cpus: int) -> str:
        """A worker node joining the head, with a custom resource that names it; its name."""
        numbers = [int(n.split("-")[1]) for n in self.services if n.startswith("worker-")]
        name = f"worker-{max(numbers, default=0) + 1}"
        resource = "stack_" + name.replace("-", "_")
        ports = _ray_ports(*_NODE_PORTS)
        cmd = [
            *(str(BIN / "ray"), "start", "--block", "--disable-usage-stats"),
            f"--address={self.services['ray-head']['gcs']}",
            *(f"--num-cpus={cpus}", f"--resources={json.dumps({resource: 1})}"),
            *_flags(ports),
            f"--temp-dir={Path(self.state['ray_temp']) / name.replace('worker-', 'w')}",
            "--object-store-memory=300000000",
        ]
        self.spawn(name, cmd, _node_env(self.services["s3"], secrets))
        self.update(
            name, resource=resource, cpus=cpus, node_manager_port=ports["node-manager-port"]
        )
        return name

    def ray_nodes(self) -> list[dict[str, Any]]:
        """The cluster's alive nodes as Ray's dashboard reports them (token from the env)."""
        req = urllib.request.Request(
            f"{self.services['ray-head']['dashboard']}/nodes?view=summary",
            headers={"Authorization": f"Bearer {os.environ.get('RAY_AUTH_TOKEN', '')}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            summary = json.load(resp)["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_nodes(self, names: list[str], timeout: float = 180) -> None:
        """Until each named node process is an alive Ray node: known by its node manager's
        port, since a lost node stays ALIVE in Ray's view for a while and a count of alive
        nodes would include it. A node that exits meanwhile (a raylet that could not start)
        fails with its log's tail."""
        for name in names:
            record = self.services[name]

            def joined(port: int = record["node_manager_port"]) -> bool:
                return any(int(n["raylet"]["nodeManagerPort"]) == port for n in self.ray_nodes())

            _wait(f"the Ray node {name}", joined, record, timeout)


# --------------------------------------------------------------------------------------------
# Commands


def up(root: Path, workers: int = 2, cpus: int = 2, bucket: str = "dupr") -> Stack:
    """Start the stack; its state (no secrets) in `root`/stack.json. A failure half-way stops
    what was started."""
    stack = Stack(root)
    running = stack.running()
    if running:
        raise StackError(f"the stack in {stack.root} is up ({', '.join(running)}); `down` first")
    secrets = _secrets()
    stack.logs.mkdir(parents=True, exist_ok=True)
    stack.state = {"dir": str(stack.root), "secrets_from_env": list(SECRETS), "services": {}}
    try:
        stack.start_s3(bucket, secrets)
        stack.start_postgres()
        stack.start_mlflow(secrets)
        stack.start_head(secrets)
        added = [stack.start_worker(secrets, cpus) for _ in range(workers)]
        stack.wait_nodes(["ray-head", *added])
    except BaseException:
        down(root)
        raise
    return stack


def add_worker(root: Path, cpus: int = 2) -> Stack:
    """One more worker node (e.g. to replace a lost one); its record joins the state."""
    stack = Stack(root)
    if "ray-head" not in stack.running():
        raise StackError(f"no stack is up in {stack.root}")
    stack.wait_nodes([stack.start_worker(_secrets(), cpus)])
    return stack


def down(root: Path) -> list[str]:
    """Stop every process group `up` and `add-worker` recorded, workers first; their names."""
    stack = Stack(root)
    if not stack.path.exists():
        return []
    stopped = []
    services = stack.services
    order = [n for n in services if n.startswith("worker-")]
    order += [n for n in ("ray-head", "mlflow", "s3", "postgres") if n in services]
    for name in order:
        if _group(services[name]):
            start = time.monotonic()
            if name == "postgres":  # SIGINT: fast shutdown (SIGTERM waits for the clients)
                stop(services[name], signal.SIGINT, timeout=60)
            else:  # Ray and MLflow hold nothing to save: the runs are in PostgreSQL
                stop(services[name], signal.SIGTERM, timeout=10)
            stopped.append(f"{name} ({time.monotonic() - start:.0f} s)")
    temp = stack.state.get("ray_temp")
    if temp and not Path(temp).is_relative_to(stack.root):
        shutil.rmtree(temp, ignore_errors=True)
    stack.path.unlink()
    return stopped


def endpoints(stack: Stack) -> dict[str, str]:
    """What a user exports to use the stack (no secret values: those are already set)."""
    services = stack.services
    return {
        "RAY_ADDRESS": services["ray-head"]["dashboard"],
        "RAY_AUTH_MODE": "token",
        "MLFLOW_TRACKING_URI": services["mlflow"]["uri"],
        "AWS_ENDPOINT_URL": services["s3"]["endpoint"],
        "AWS_REGION": REGION,
    }


def describe(stack: Stack) -> str:
    lines = [f"stack in {stack.root}:"]
    for name, rec in stack.services.items():
        where = rec.get("uri") or rec.get("endpoint") or rec.get("dashboard") or ""
        extra = f"  {rec['cpus']} CPUs, resource {rec['resource']}" if "resource" in rec else ""
        status = "up" if _alive(rec) else "DOWN"
        lines.append(f"  {name:<10} {status:<5} pid {rec['pid']:<8} {where}{extra}")
    lines += [
        f"  ray logs   {stack.state.get('ray_temp')}",
        "",
        "export " + " ".join(f"{k}={v}" for k, v in endpoints(stack).items()),
        f"# with {', '.join(stack.state['secrets_from_env'])} as given to `up`. Then, e.g.:",
        "ray job submit --working-dir . -- python pipelines/pretrain_and_eval.py "
        f"storage=s3://{stack.services['s3']['bucket']}/runs "
        f"tracking_uri={stack.services['mlflow']['uri']} "
        "pretrain.num_workers=2 pretrain.cpus_per_worker=2",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dupr_platform.stack",
        description="A local multi-node stack: PostgreSQL, S3 (moto), MLflow, Ray head + workers.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "add-worker"])
    parser.add_argument("--dir", type=Path, default=Path("runs/stack"), help="state and logs")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (up)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each worker node offers")
    parser.add_argument("--bucket", default="dupr", help="the S3 bucket (up)")
    parser.add_argument("--json", action="store_true", help="status: the state as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(describe(up(args.dir, args.workers, args.cpus, args.bucket)))
        elif args.command == "add-worker":
            print(describe(add_worker(args.dir, args.cpus)))
        elif args.command == "down":
            stopped = down(args.dir)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        else:
            stack = Stack(args.dir)
            if not stack.path.exists():
                print(f"no stack in {stack.root}")
                return 1
            print(json.dumps(stack.state, indent=2) if args.json else describe(stack))
            return 0 if len(stack.running()) == len(stack.services) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
