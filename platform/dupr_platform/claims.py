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
room. A plain pipeline keeps its own `Claims`; a sweep's driver keeps one in a Ray actor for its
trials (`SharedClaims`), with the trial actors' own CPUs in it. Pipelines started apart (two
`ray job submit`s on one cluster) keep one each; what they see of each other is Ray's: a
pre-training whose workers wait to be placed (`room_beside_waiting`), not one in the seconds
before Ray Train asks for them.
"""

from __future__ import annotations

from typing import Any

import ray

KINDS = ("CPU", "GPU")


def add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in KINDS}


def room_beside_waiting() -> dict[str, float]:
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


class Claims:
    """What each owner (a pipeline, by its run key) holds of the cluster's CPUs and GPUs."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, float]] = {}

    def hold(self, owner: str, holding: dict[str, float]) -> None:
        """Set what `owner` holds now, whether or not it fits: a pre-training's workers start
        whatever the others hold (they wait for what those give back), and a decrease always
        fits."""
        self.held[owner] = {k: float(holding.get(k, 0.0)) for k in KINDS}

    def claim(self, owner: str, holding: dict[str, float], total: dict[str, float]) -> bool:
        """Set `owner`'s holding to `holding` if it fits in `total` (the alive nodes' CPUs and
        GPUs) beside everybody else's; whether it did."""
        others = self.others(owner)
        if any(others[k] + holding.get(k, 0.0) > total.get(k, 0.0) for k in KINDS):
            return False
        self.hold(owner, holding)
        return True

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
