"""The cluster's CPUs and GPUs that pipelines sharing it hold, or are about to hold.

A pipeline launches its evaluations beside its pre-training only into room that the
pre-training's workers will not need (dupr_platform.pipeline). Ray's own count of what is free
(`ray.available_resources()`) does not see a pre-training whose placement group does not exist
yet. The trials of a sweep run several pipelines at once: each would count the room the others'
pre-trainings are about to take, and their evaluations together could take what those
pre-trainings then wait for, hours for a fine-tuning.

So each pipeline states what it holds (its pre-training's needs while one runs, and its running
evaluations) in one `Claims`, and takes room for an evaluation with `claim`: one call that
checks it against everybody's holdings and counts it, so two pipelines cannot take the same
room. A pre-training starts only once the others leave room for it (`start`), in the order
they asked (`want`): waiting in Ray instead, Ray Train counts each `worker_group_start_minutes`
as a failure of the run, and a trial's pre-training that waits for another's (days at paper
scale) would fail. A plain pipeline keeps its own `Claims`; a sweep's driver keeps one in a
Ray actor for its trials (`SharedClaims`), with the trial actors' own CPUs in it. Pipelines
started apart (two `ray job submit`s on one cluster) keep one each; what they see of each other
is Ray's (what is free, and a pre-training whose workers wait to be placed) and the cluster's
`StartLine`: the room of each pre-training let start whose workers Ray has not placed yet
(`room_beside_waiting` counts both). Without it, two jobs that waited for the same room both
saw it free and started, and the second's workers waited in Ray under Ray Train's start limits:
Ray Train asks for its workers seconds after the check (the MLflow run, its controller).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import ray

KINDS = ("CPU", "GPU")


def add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in KINDS}


def subtract(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in KINDS}


def free_beside_pending() -> dict[str, float]:
    """The CPUs and GPUs free now less what the placement groups that wait to be placed ask:
    Ray counts those as free, though a pre-training's workers (another job's: a pipeline
    started apart) wait for them."""
    free = ray.available_resources()
    room = {k: free.get(k, 0.0) for k in KINDS}
    for group in ray.util.placement_group_table().values():
        if group["state"] == "PENDING":
            for bundle in group["bundles"].values():
                room = {k: room[k] - float(bundle.get(k, 0.0)) for k in KINDS}
    return room


# Set by `cluster.start_ray` where a driver started its own local instance, and inherited by
# the instance's processes: no other job runs there (a sweep's trials share their claims), so
# the `StartLine` is not needed, and its actor process is not started.
ONE_JOB_CLUSTER = "DUPR_ONE_JOB_CLUSTER"


def room_beside_waiting() -> dict[str, float]:
    """What is free now beyond the placement groups that wait and the room of the pre-trainings
    let start whose workers Ray has not placed yet (`StartLine`, any job's)."""
    return subtract(free_beside_pending(), StartLine.reserved_now())


class StartLine:
    """The room that pre-trainings of every job on the cluster were let start into (`reserve`)
    and whose workers Ray has not placed yet: it is theirs against every job's check until Ray
    places the workers (their first rank gives it back, `release`) or the pre-training ends.
    One actor per cluster, detached, found by name from every job, with no CPU of its own. A
    reservation lapses when its job's driver is gone (killed before it gave it back) or after
    `lapse_s` (a trial actor killed while its sweep goes on)."""

    # The name carries the version of these methods: the actor outlives the job that made it,
    # and a job of a later release must not call one of an earlier release.
    NAME, NAMESPACE = "dupr-start-line-1", "dupr"

    def __init__(self) -> None:
        # key -> (the reserving job's id, its need, when it lapses: time.time())
        self.held: dict[str, tuple[str, dict[str, float], float]] = {}

    def reserve(
        self, key: str, job: str, need: dict[str, float], free: dict[str, float], lapse_s: float
    ) -> bool:
        """Reserve `need` for `key` if it fits in `free` (what the caller saw free beside the
        pending placement groups) beside the others' reservations; whether it did. One call
        to the actor, so two jobs cannot take the same room."""
        room = subtract(free, self.reserved())
        if any(need.get(k, 0.0) > room[k] for k in KINDS):
            return False
        self.held[key] = (job, {k: float(need.get(k, 0.0)) for k in KINDS}, time.time() + lapse_s)
        return True

    def release(self, key: str) -> None:
        self.held.pop(key, None)

    def reserved(self) -> dict[str, float]:
        """The sum of the reservations that hold now."""
        self._forget_lapsed()
        total = dict.fromkeys(KINDS, 0.0)
        for _, need, _ in self.held.values():
            total = add(total, need)
        return total

    def _forget_lapsed(self) -> None:
        if not self.held:
            return
        # The job table is Ray's internal API (Ray 2.60 is pinned); `ray.util.state.list_jobs`
        # needs the dashboard, which a cluster may run without.
        from ray._private.state import jobs

        alive = {j["JobID"] for j in jobs() if not j["IsDead"]}
        now = time.time()
        self.held = {
            key: (job, need, until)
            for key, (job, need, until) in self.held.items()
            if job in alive and until > now
        }

    @classmethod
    def actor(cls, create: bool = False) -> Any:
        """The cluster's line (created by the first pre-training that waits), or None."""
        if create:
            return (
                ray.remote(num_cpus=0)(cls)
                .options(
                    name=cls.NAME,
                    namespace=cls.NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                )
                .remote()
            )
        try:
            return ray.get_actor(cls.NAME, namespace=cls.NAMESPACE)
        except ValueError:  # no pre-training has waited on this cluster yet
            return None

    @classmethod
    def reserved_now(cls) -> dict[str, float]:
        line = None if os.environ.get(ONE_JOB_CLUSTER) else cls.actor()
        return dict.fromkeys(KINDS, 0.0) if line is None else ray.get(line.reserved.remote())

    @classmethod
    def try_reserve(
        cls, need: dict[str, float], free: dict[str, float], lapse_s: float
    ) -> str | None:
        """A key for a reservation of `need` in the cluster's line, or None where it does not
        fit beside the others'; `""` on a cluster of one job (nothing to reserve against)."""
        if os.environ.get(ONE_JOB_CLUSTER):
            return ""
        key = uuid.uuid4().hex
        line = cls.actor(create=True)
        return key if ray.get(line.reserve.remote(key, _job(), need, free, lapse_s)) else None

    @classmethod
    def release_now(cls, key: str | None) -> None:
        """Give `key`'s reservation back (its workers are placed, or its pre-training ended)."""
        line = cls.actor() if key else None
        if line is not None:
            ray.get(line.release.remote(key))


def _job() -> str:
    """The id of the job this process works for (a trial actor's: its sweep's driver)."""
    return ray.get_runtime_context().get_job_id()


class Claims:
    """What each owner (a pipeline, by its run key) holds of the cluster's CPUs and GPUs."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, float]] = {}
        # The pre-trainings that wait to start, in the order they asked, with their needs
        # (which their owners' holdings already count) and their workers' bundles.
        self.waiting: dict[str, dict[str, float]] = {}
        self.shapes: dict[str, list[dict[str, float]]] = {}

    def hold(self, owner: str, holding: dict[str, float]) -> None:
        """Set what `owner` holds now, whether or not it fits: a pre-training's workers start
        whatever the others hold (they wait for what those give back), and a decrease always
        fits."""
        self.held[owner] = {k: float(holding.get(k, 0.0)) for k in KINDS}

    def claim(
        self,
        owner: str,
        holding: dict[str, float],
        total: dict[str, float],
        before_waiting: bool = False,
    ) -> bool:
        """Set `owner`'s holding to `holding` if it fits in `total` (the alive nodes' CPUs and
        GPUs) beside everybody else's; whether it did. `before_waiting`: beside what the others
        hold but the needs of their pre-trainings that wait to start (the evaluations of a
        pipeline past its pre-trainings go first; `start` then counts them)."""
        others = self.others(owner)
        if before_waiting:
            for waiter, need in self.waiting.items():
                if waiter != owner:
                    others = {k: others[k] - need[k] for k in KINDS}
        if any(others[k] + holding.get(k, 0.0) > total.get(k, 0.0) for k in KINDS):
            return False
        self.hold(owner, holding)
        return True

    def want(self, owner: str, bundles: list[dict[str, float]]) -> None:
        """`owner`'s pre-training waits to start with its workers' `bundles` (their sum held
        by `owner` from now on): in line after those that asked before."""
        self.waiting[owner] = {k: float(sum(b.get(k, 0.0) for b in bundles)) for k in KINDS}
        self.shapes[owner] = list(bundles)

    def shape(self, owner: str) -> list[dict[str, float]]:
        """The bundles of `owner`'s pre-training while it waits to start (`[]` otherwise)."""
        return self.shapes.get(owner, [])

    def start(self, owner: str, total: dict[str, float]) -> dict[str, float] | None:
        """Whether `owner`'s pre-training may start: None if so (it leaves the line), else
        what the others hold. It may where its need fits in `total` beside what the others
        hold but the needs of pre-trainings that asked after it (they wait for it); or where
        they hold nothing of that (a cluster that lost a node: Ray Train waits for one)."""
        need = self.waiting.get(owner)
        if need is None:
            return None
        after = list(self.waiting)[list(self.waiting).index(owner) + 1 :]
        busy = self.others(owner)
        for later in after:
            busy = {k: busy[k] - self.waiting[later][k] for k in KINDS}
        fits = all(busy[k] + need[k] <= total.get(k, 0.0) for k in KINDS)
        if not (fits or all(v <= 0 for v in busy.values())):
            return busy
        self.forget_wait(owner)
        return None

    def forget_wait(self, owner: str) -> None:
        """`owner`'s pre-training no longer waits to start (it started, failed, or was
        interrupted)."""
        self.waiting.pop(owner, None)
        self.shapes.pop(owner, None)

    def others(self, owner: str) -> dict[str, float]:
        """What everybody but `owner` holds."""
        total = dict.fromkeys(KINDS, 0.0)
        for who, holding in self.held.items():
            if who != owner:
                total = add(total, holding)
        return total

    def forget(self, owner: str) -> None:
        """`owner` ended (or its trial failed and Tune starts it again): it holds nothing."""
        self.held.pop(owner, None)
        self.forget_wait(owner)


class SharedClaims:
    """`Claims` in a Ray actor that a sweep's driver creates and keeps (it ends with the
    driver), found by name from its trials' pipelines; the same methods, each a call to the
    actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name

    @classmethod
    def create(cls, name: str) -> SharedClaims:
        # No CPU of its own: it starts even while the trials take every CPU.
        return cls(ray.remote(num_cpus=0)(Claims).options(name=name).remote(), name)

    @classmethod
    def named(cls, name: str) -> SharedClaims:
        return cls(ray.get_actor(name), name)

    def __getattr__(self, method: str) -> Any:
        remote = getattr(self.actor, method).remote
        return lambda *args: ray.get(remote(*args))
