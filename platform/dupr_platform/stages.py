"""Pipeline stages whose outputs are cached in storage under a hash of what they depend on.

A `Stage` has a name, a kind (which code runs it), a config slice, inputs and resources. Its
inputs are literal URIs or `Ref`s to another stage's outputs. Its key hashes (name, kind, config
slice, inputs), where a `Ref` counts as (upstream key, output name). So every key in a pipeline
is known before anything runs, and changing a pre-training setting changes the keys of
everything downstream of it.

A stage writes its outputs into its own folder, `{storage}/stages/{name}-{key}/`. The folder
counts as complete only once `_COMPLETE.json` is there. That file is written last, after every
output, and records the outputs, the metrics and the MLflow run that produced them. A stage
that crashes mid-way therefore leaves no marker and simply runs again next time. A stage whose
marker exists is a cache hit: it is not run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from dupr.data import default_data_home
from dupr_platform.storage import Storage, localize

MARKER = "_COMPLETE.json"
STAGES_DIR = "stages"
# A running stage's state to resume from (a detection fine-tuning's), in its folder; dropped
# once the stage is complete.
RESUME_DIR = "resume"
# Beside that state: the MLflow run it belongs to, which a rerun continues (one run per stage,
# as pre-training has one run per job).
RESUME_RUN = f"{RESUME_DIR}/run.json"


@dataclass(frozen=True)
class Ref:
    """The output `output` of the stage named `stage`."""

    stage: str
    output: str


@dataclass
class Stage:
    name: str  # unique in a pipeline, e.g. "detection/faster_rcnn_fpn/dupr"
    kind: str  # which body runs it: "pretrain", "convert", "detection", ...
    config: dict[str, Any]
    inputs: dict[str, str | Ref | None] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    # The config's settings that change how the stage runs, not what it produces (its
    # schema's EXECUTION_ONLY fields): outside its key, so that changing them keeps its cache
    # and its resume state, and outside its MLflow params, so that a continued run may change
    # them.
    execution_only: frozenset[str] = frozenset()
    key: str = ""  # filled by `assign_keys`

    @property
    def folder(self) -> str:
        """The stage's output folder, relative to the storage root."""
        return f"{STAGES_DIR}/{self.name.replace('/', '-')}-{self.key}"

    def defining_config(self) -> dict[str, Any]:
        """The config that decides what the stage produces: its key's part, its params."""
        return {k: v for k, v in self.config.items() if k not in self.execution_only}

    def upstream(self) -> list[str]:
        return sorted({v.stage for v in self.inputs.values() if isinstance(v, Ref)})


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def assign_keys(stages: list[Stage]) -> dict[str, Stage]:
    """Compute every stage's key (upstream stages first); return the stages by name.

    Raises ValueError for duplicate names, references to unknown stages or outputs that
    do not exist yet in the order given (the list must be topologically sorted).
    """
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in by_name:
            raise ValueError(f"stage {stage.name!r}: defined twice")
        inputs: dict[str, Any] = {}
        for name, value in sorted(stage.inputs.items()):
            if isinstance(value, Ref):
                if value.stage not in by_name:
                    raise ValueError(
                        f"stage {stage.name!r}: input {name!r} refers to unknown stage "
                        f"{value.stage!r}"
                    )
                inputs[name] = {"stage_key": by_name[value.stage].key, "output": value.output}
            else:
                inputs[name] = value
        config = stage.defining_config()
        digest = hashlib.sha256(
            _canonical(
                {"name": stage.name, "kind": stage.kind, "config": config, "inputs": inputs}
            ).encode()
        ).hexdigest()
        stage.key = digest[:12]
        by_name[stage.name] = stage
    return by_name


def read_marker(storage: Storage, stage: Stage) -> dict[str, Any] | None:
    """The completion record of `stage`, or None when its outputs are not complete."""
    rel = f"{stage.folder}/{MARKER}"
    if not storage.exists(rel):
        return None
    return storage.read_json(rel)


def resume_run(storage: Storage, folder: str) -> str | None:
    """The MLflow run of the resume state in the stage folder `folder`, if there is one."""
    rel = f"{folder}/{RESUME_RUN}"
    return str(storage.read_json(rel)["run_id"]) if storage.exists(rel) else None


def write_marker(
    storage: Storage,
    stage: Stage,
    inputs: dict[str, str | None],
    outputs: dict[str, str],
    metrics: dict[str, float],
    run_id: str,
) -> dict[str, Any]:
    """Mark `stage` complete. Call only after every output has been written."""
    record = {
        "stage": stage.name,
        "kind": stage.kind,
        "key": stage.key,
        "config": stage.config,
        "inputs": inputs,
        "outputs": outputs,
        "metrics": metrics,
        "run_id": run_id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(f"{stage.folder}/{MARKER}", record)
    return record


def resolve_inputs(stage: Stage, records: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """Concrete URIs of `stage`'s inputs, from the completion records of upstream stages."""
    resolved: dict[str, str | None] = {}
    for name, value in stage.inputs.items():
        if isinstance(value, Ref):
            outputs = records[value.stage]["outputs"]
            if value.output not in outputs:
                raise ValueError(
                    f"stage {stage.name!r}: upstream {value.stage!r} has no output "
                    f"{value.output!r} (has: {', '.join(sorted(outputs))})"
                )
            resolved[name] = outputs[value.output]
        else:
            resolved[name] = value
    return resolved


@dataclass
class StageContext:
    """What a stage body gets: its resolved inputs and where to put outputs and logs."""

    name: str
    kind: str
    key: str
    config: dict[str, Any]
    inputs: dict[str, str | None]
    storage_uri: str  # the pipeline's storage root
    folder: str  # the stage's output folder, relative to the storage root
    run_id: str  # the stage's MLflow run
    tracking_uri: str
    experiment: str
    cpus: float = 1.0
    gpus: float = 0.0
    # A smoke run's stage: report its step time, peak memory and FLOPs (dupr_platform.smoke).
    profile: bool = False


@dataclass
class StageOutput:
    """What a stage body returns: outputs as files in its folder, metrics, files to log."""

    files: dict[str, str]  # output name -> file (or folder) name in the stage folder
    metrics: dict[str, float]
    values: dict[str, str] = field(default_factory=dict)  # outputs that are not files
    artifacts: list[str] = field(default_factory=list)  # file names to log to the MLflow run
    # How long it ran on its worker (`run_stage`): the driver's time since it submitted the
    # stage adds the wait for its resources. 0: not measured.
    seconds: float = 0.0


def local_input(uri: str) -> str:
    """A local path for a stage input: local paths as they are; data and weights on object
    storage are copied once per node into the data home (`dupr_platform.storage.localize`),
    because the dupr/ code that reads them reads local files."""
    cache = default_data_home() / "remote"
    cache.mkdir(parents=True, exist_ok=True)
    return localize(uri, cache)
