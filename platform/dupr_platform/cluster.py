"""The Ray cluster a driver works on: its own local instance, or the cluster in RAY_ADDRESS.

- `start_ray` connects to the cluster named by RAY_ADDRESS (as inside `ray job submit`), or
  starts a local instance that belongs to this driver alone. The instance's address is put in
  the environment its processes inherit, so Ray Train's own helpers (its placement-group
  cleaner) talk to it, not to another instance on the machine ("Found multiple active Ray
  instances"); two pipelines on one machine do not see each other.
- Credentials never travel through Ray (Ray writes runtime environments to its logs in full):
  the workers of a local instance inherit the driver's environment, and the nodes of a cluster
  have their own (a Kubernetes Secret as env, an instance profile, the node's `AWS_*`).
  `forwarded_env` is what may travel: endpoints, regions, the data folder.
- `check_nodes` runs the storage and tracking checks on every other node of a connected cluster
  before anything is scheduled there, so a node without credentials fails in preflight with
  one line that names the missing variable, never its value.
- `largest_node`: what one task or training worker can get at most. A task never spans nodes,
  so one that asks more than any node has waits forever, though the cluster's total has it.
- `task_starts`: which of a driver's submitted tasks run, and since when, as opposed to those
  still queued for their resources (Ray's state API).
- `ask_autoscaler`: room for work that waits outside Ray (a sweep trial's pre-training waiting
  for its turn), which an autoscaler would not see otherwise.
- `wait_for_room`: a pre-training starts once the cluster has room for its workers, not in
  Ray, where each `worker_group_start_minutes` of waiting counts as a failure of the run; the
  room stays reserved for it in the cluster's `StartLine` until its workers are placed, so a
  job that waited for the same room does not start into it meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ray

from dupr.config import ConfigError
from dupr_platform import console
from dupr_platform.claims import (
    KINDS,
    ONE_JOB_CLUSTER,
    Claims,
    SharedClaims,
    StartLine,
    free_beside_pending,
    subtract,
)
from dupr_platform.environment import environment
from dupr_platform.ports import free_port
from dupr_platform.storage import AWS_CREDENTIALS, aws_settings, check_storage, open_storage
from dupr_platform.tracking import TRACKING_CREDENTIALS, check_tracking

log = logging.getLogger(__name__)

# Ray starts its worker processes at niceness 15 (RAY_worker_niceness), so that its own control
# processes stay responsive. A training worker at 15 yields the CPU to every normal-priority
# process on the node, Ray's driver and agents included: on a 2-core machine that made each step
# 15-25 % slower than the same loop in a plain process (benchmarks/ray_overhead.py). Processes
# that do the experiment's compute (training workers, pipeline stage tasks) run at normal priority,
# as Ray itself does for job drivers; Ray Data's decoding tasks stay at 15 and yield to them.
COMPUTE_PRIORITY = {"RAY_worker_niceness": "0"}


def forwarded_env() -> dict[str, str]:
    """The driver's settings that workers on other nodes need and that are not secrets."""
    env = aws_settings()
    if os.environ.get("DUPR_DATA_HOME"):
        env["DUPR_DATA_HOME"] = os.environ["DUPR_DATA_HOME"]
    return env


# Ray Tune copies these from the driver's environment into the runtime environment of every
# trial (ray/tune/execution/class_cache.py), which Ray's runtime-env agent writes to its log.
_TUNE_COPIED_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
)


@contextlib.contextmanager
def credentials_withheld() -> Iterator[None]:
    """Keep Ray Tune from copying credential variables into its trials' runtime environments.

    Trials get credentials as every Ray worker does (inherited from the driver on a local
    instance, the node's own on a cluster). Ray Tune 2.60 has no switch for the copy; it reads
    the names from the set `class_cache.ENV_VARS_TO_PROPAGATE`, so the credential names are
    taken out of that set while Tune runs. The values stay in this process's environment:
    pyarrow's S3 filesystem reads them on every request, and Tune's own storage calls (the
    sweep's s3:// folder) need them.
    """
    from ray.tune.execution import class_cache

    names = set(_TUNE_COPIED_CREDENTIALS) & class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(names)
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE.update(names)


_started = False  # whether start_ray initialised Ray in this process
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's switch (default on)


def stop_ray() -> None:
    """Disconnect (and stop a local instance) if `start_ray` started it; else nothing."""
    global _started
    if _started and ray.is_initialized():
        ray.shutdown()
    _started = False
    os.environ.pop(ONE_JOB_CLUSTER, None)


def start_ray(where: str) -> bool:
    """Connect to RAY_ADDRESS's cluster, or start this driver's own local instance.

    Returns True when connected to an existing cluster (whose other nodes need checking).
    `where` names the caller in the one line that says where Ray's output goes.
    """
    global _started
    if ray.is_initialized():
        return False
    _started = True
    # ray.init replaces a driver's SIGTERM handler with `sys.exit(15)` (and Ray's C++ failure
    # handler prints a stack dump first): `ray job stop` then skipped the command's own handler
    # (cli.run_cli: one line, exit status 143) and the driver died of SIGABRT mid-unwind.
    sigterm = signal.getsignal(signal.SIGTERM)
    connected = bool(os.environ.get("RAY_ADDRESS"))
    if connected:
        ray.init(logging_level=logging.INFO)
    else:
        port = free_port()
        own = {
            "RAY_GCS_SERVER_PORT": str(port),
            "RAY_ADDRESS": f"127.0.0.1:{port}",
            # One node that no autoscaler drains: Ray Train's preemption watcher (an actor per
            # training that polls for draining nodes, and only logs them) has nothing to see
            # here; its process took about 4 s of a toy pipeline's 60 on 2 cores (noisy A/B).
            PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0"),
        }
        os.environ[ONE_JOB_CLUSTER] = "1"  # kept: this driver's checks read it too
        # Inherited by the instance's processes, not kept in this one.
        with environment(own):
            ray.init(
                address="local",
                logging_level=logging.INFO,
                dashboard_port=free_port(),
            )
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    console.route_worker_output()
    console.announce(where)
    return connected


def _node_probe(storage_uri: str, tracking_uri: str, names: list[str]) -> dict[str, Any]:
    """On one node: which of `names` are unset, and the storage and tracking checks."""
    missing = [n for n in names if not os.environ.get(n)]
    problems = []
    for check in (
        lambda: check_storage(open_storage(storage_uri)),
        lambda: check_tracking(tracking_uri),
    ):
        try:
            check()
        except ValueError as exc:
            problems.append(str(exc))
    return {"missing": missing, "problems": problems}


def check_nodes(storage_uri: str, tracking_uri: str) -> None:
    """Every alive node other than the driver's reaches storage and tracking as the driver does.

    A ConfigError names the node, what fails there and which credential variables the driver
    has but the node lacks (names only). Nodes that reach both are fine, whatever their
    credential source.
    """
    names = [n for n in (*AWS_CREDENTIALS, *TRACKING_CREDENTIALS) if os.environ.get(n)]
    here = ray.get_runtime_context().get_node_id()
    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pending = {}
    for node in ray.nodes():
        if not node.get("Alive") or node["NodeID"] == here:
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        ref = probe.options(
            scheduling_strategy=strategy, runtime_env={"env_vars": forwarded_env()}
        ).remote(storage_uri, tracking_uri, names)
        pending[ref] = node.get("NodeManagerAddress", node["NodeID"])
    for ref, address in pending.items():
        found = ray.get(ref, timeout=120)
        if found["problems"]:
            lacking = (
                f"; {', '.join(found['missing'])} set here but not on that node"
                if found["missing"]
                else ""
            )
            raise ConfigError(f"node {address}: {found['problems'][0]}{lacking}")


def largest_node() -> dict[str, float]:
    """The most of each resource (CPU, GPU, ...) that one alive node of the cluster has."""
    most: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in node.get("Resources", {}).items():
                most[name] = max(most.get(name, 0.0), float(amount))
    return most


WAITING_REQUEST_S = 60.0  # an autoscaler request lapses this long after it was last renewed


def ask_autoscaler(requester: str, bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaler (the cluster launcher's) for room for `bundles` beside what the
    cluster's nodes hold, as `requester`; `[]` withdraws its request. Through Ray's autoscaling
    coordinator, the detached actor that Ray Train and Ray Data ask through (internal in Ray
    2.60, which is pinned): it merges every requester's bundles into Ray's one request per
    cluster (`request_resources`) and sends that again every 20 s, so a request made directly
    would replace the other jobs' and be replaced at its next tick. Ray's request states the
    cluster's whole shape (bin-packed against the nodes' totals, not what is free), so the
    alive nodes' CPUs and GPUs are asked too, under one requester that every waiting
    pre-training renews (they exist: no node is added for them). A request lapses
    WAITING_REQUEST_S after it was last made (its driver was killed). Without an autoscaler
    nobody reads it."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    if not bundles:
        ray.get(coordinator.cancel_request.remote(requester))
        return
    nodes = [
        {k: float(v) for k, v in n["Resources"].items() if k in KINDS and v}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    ray.get(
        [
            coordinator.request_resources.remote(
                "dupr-cluster-nodes", [n for n in nodes if n], WAITING_REQUEST_S
            ),
            coordinator.request_resources.remote(requester, bundles, WAITING_REQUEST_S),
        ]
    )


START_CHECK_S = 2.0  # how often a pre-training that waits to start asks again (`Claims.start`)


def wait_for_room(
    claims: Claims | SharedClaims,
    owner: str,
    need: dict[str, float],
    say: Callable[[dict[str, float]], None],
    lapse_s: float,
) -> str:
    """Return once the cluster has room for `owner`'s pre-training, which `need`s that much and
    is in `claims`' line (`Claims.want`): free now beyond the placement groups that wait
    (another job's pre-training) and the room that other jobs' pre-trainings were let start
    into (`StartLine`), and in the claims beside what the others sharing them hold or waited
    for before it (a sweep's other trials, `Claims.start`). Waiting in Ray instead, Ray Train
    counts each `worker_group_start_minutes` as a failure of the run. `say(room)` once, if it
    waits. Meanwhile an autoscaler is asked for the waiting workers' room (Ray Train's
    placement group would have asked), beside every other job's that waits.

    The room is reserved in the cluster's `StartLine` (for `lapse_s` at most): the key
    returned, which the pre-training's first worker, or its end, gives back
    (`StartLine.release_now`)."""
    said, requester = False, f"dupr-waiting-{uuid.uuid4().hex}"
    try:
        while True:
            free = free_beside_pending()
            room = {k: max(0.0, v) for k, v in subtract(free, StartLine.reserved_now()).items()}
            if all(need.get(k, 0.0) <= room[k] for k in KINDS):
                key = StartLine.try_reserve(need, free, lapse_s)
                if key is not None:
                    if claims.start(owner, ray.cluster_resources()) is None:
                        return key
                    StartLine.release_now(key)
            ask_autoscaler(requester, claims.shape(owner))  # renewed while it waits
            if not said:
                said = True
                say(room)
            time.sleep(START_CHECK_S)
    finally:
        claims.forget_wait(owner)
        if said:
            ask_autoscaler(requester, [])


def amounts(amounts: dict[str, float], kinds: Sequence[str] = KINDS) -> str:
    """`2 CPU, 1 GPU`: the amounts of `kinds` given (`nothing` if none)."""
    return ", ".join(f"{amounts[k]:g} {k}" for k in kinds if amounts.get(k)) or "nothing"


def task_starts(refs: Iterable[ray.ObjectRef]) -> dict[ray.ObjectRef, float] | None:
    """When each task of `refs` that runs now started (epoch seconds; a task queued for its
    resources or a worker is left out), from Ray's state API; None where that cannot say (a
    cluster started without its dashboard, or one that does not answer within seconds)."""
    from ray.util.state import list_tasks

    by_id = {ref.task_id().hex(): ref for ref in refs}
    context = ray.get_runtime_context()
    try:
        tasks = list_tasks(
            # This driver's cluster: unnamed, the state API looks for one on the machine and
            # gives up where it finds several (two pipelines' own local instances).
            address=context.gcs_address,
            filters=[
                ("job_id", "=", context.get_job_id()),
                ("state", "=", "RUNNING"),
            ],
            detail=True,  # for start_time_ms
            limit=10_000,
            timeout=5,
            raise_on_missing_output=False,
        )
    except Exception as exc:  # no dashboard, or it did not answer: not worth stopping for
        log.debug("Ray's state API: %s", exc)
        return None
    return {
        by_id[t.task_id]: t.start_time_ms / 1000.0
        for t in tasks
        if t.task_id in by_id and t.start_time_ms
    }
