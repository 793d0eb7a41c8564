"""Pre-train → convert → evaluate, as cached stages under one MLflow parent run.

`build_stages` turns the resolved pipeline config (configs/pretrain_and_eval.yaml) into stages:

    pretrain                       DUPR pre-training on Ray Train (dupr_platform.ray_pretrain)
    convert/<init>                 checkpoint → torchvision and detectron2 weights
    detection/<detector>/<init>    fine-tune and evaluate a detector (Tables I–III)
    spatial/<init>                 IoU–similarity curve (§4.6.1, Eq. 9)
    correspondence/<init>          patch matching between two views (§4.6.2)
    probe/<init>                   per-level linear probe (Table VI b)
    object_probe/<init>            linear probe on the ground-truth boxes' RoI features

where <init> is the pre-trained model, "random" and every baseline checkpoint given by URI.
`run_pipeline` checks everything it can first, then runs what is not cached: pre-training
through its launcher, everything else as Ray tasks with their own CPUs/GPUs. Every stage gets
an MLflow child run under the pipeline's parent run, including the cache hits. At the end it
prints a summary table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from mlflow.exceptions import MlflowException
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dupr.config import (
    METHOD_REVISION,
    ConfigError,
    DUPRConfig,
    baseline_method,
    field_prefix,
)
from dupr.data.folder import ImageDecodeError
from dupr.io import markdown_table
from dupr_platform import console, convert_stage, eval_stages, report, smoke, software
from dupr_platform.claims import (
    KINDS,
    Claims,
    SharedClaims,
    StartLine,
    add,
    room_beside_waiting,
)
from dupr_platform.cluster import (
    COMPUTE_PRIORITY,
    amounts,
    check_nodes,
    forwarded_env,
    largest_node,
    start_ray,
    task_starts,
    wait_for_room,
)
from dupr_platform.configs import DetectionEvalConfig, selected_kinds, validate_pipeline
from dupr_platform.failures import UnrecoverableError
from dupr_platform.progress import format_duration
from dupr_platform.ray_pretrain import (
    PretrainJob,
    PretrainSettings,
    absolute_locations,
    execution_only_fields,
    preflight_cluster,
    preflight_config,
    pretraining_bundles,
    pretraining_needs,
    run_pretraining,
    start_lapse_s,
)
from dupr_platform.recovery import driving
from dupr_platform.scratch import scratch_folder
from dupr_platform.stages import (
    RESUME_DIR,
    Ref,
    Stage,
    StageContext,
    StageOutput,
    assign_keys,
    read_marker,
    resolve_inputs,
    resume_run,
    write_marker,
)
from dupr_platform.storage import check_storage, open_storage
from dupr_platform.text import one_line
from dupr_platform.tracking import (
    CONTINUED_BY_TAG,
    ERROR_TAG,
    RunGone,
    RunLogger,
    absolute_tracking_uri,
    check_tracking,
    patient_client,
    redact_tree,
    unreachable_reason,
)

log = logging.getLogger(__name__)

EVALUATIONS = ("detection", "spatial", "correspondence", "probe", "object_probe")
CACHE_HIT_TAG = "dupr.cache_hit"
PIPELINE_TAG = "dupr.pipeline"  # on a pipeline's parent run: the pipeline's name


# ---------------------------------------------------------------------------------------------
# Config → stages


def pretrain_job(cfg: dict[str, Any], stage: Stage) -> PretrainJob:
    """The launcher's job for a pretrain stage: its method is the stage's (the model's or a
    baseline's, at the stage's seed), its checkpoints live in the stage folder."""
    values = dict(cfg["pretrain"])
    values.pop("label", None)
    values.pop("method")
    job = PretrainJob(
        name=stage.folder.rsplit("/", 1)[1],
        method=DUPRConfig.from_dict(stage.config["method"]),
        storage=open_storage(cfg["storage"]).uri_for(stage.folder.rsplit("/", 1)[0]),
        tracking_uri=cfg["tracking_uri"],
        experiment=cfg["experiment"],
        **values,
    )
    return job


def _pretrain_slice(cfg: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
    """The pre-training settings that change its weights: its cache key."""
    neutral = execution_only_fields(PretrainSettings)
    values = {k: v for k, v in cfg["pretrain"].items() if k not in neutral}
    values.pop("data", None)  # an input, not config
    values.pop("label", None)  # a name in the results, not a setting
    values["method"] = method
    values["method_revision"] = METHOD_REVISION  # the code's part of what it trains
    return values


def study_seeds(cfg: dict[str, Any]) -> list[int | None]:
    """The seeds the study runs with; [None]: once, with the seeds as configured."""
    return list(cfg.get("seeds") or [None])


def seed_suffix(seed: int | None) -> str:
    """What a stage name carries for its seed: nothing for seed 0 (or the configured seeds),
    so that `seeds=[0, 1, 2]` shares seed 0's stages with a run without seeds."""
    return f"@seed{seed}" if seed else ""


def with_seed(cfg: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """`cfg` with the pre-training's and every evaluation's seed set to `seed`."""
    if seed is None:
        return cfg
    cfg = json.loads(json.dumps(cfg))
    cfg["pretrain"]["method"]["seed"] = seed
    for kind in EVALUATIONS:  # every evaluation has a seed
        cfg["eval"][kind]["seed"] = seed
    return cfg


def build_stages(cfg: dict[str, Any]) -> list[Stage]:
    """All stages of the study, upstream first, with their keys assigned: per seed, the
    pre-training of the model and of each baseline method, their conversions, and every
    evaluation of every initialisation."""
    stages = [
        Stage(f"convert/{name}", "convert", {}, {"checkpoint": uri})
        for name, uri in (cfg["baselines"].get("checkpoints") or {}).items()
    ]
    for seed in study_seeds(cfg):
        stages += _seed_stages(with_seed(cfg, seed), seed_suffix(seed))
    assign_keys(stages)
    return stages


def _seed_stages(cfg: dict[str, Any], suffix: str) -> list[Stage]:
    """One seed's pre-trainings and evaluations; names end in `suffix`."""
    ev = cfg["eval"]
    label = cfg["pretrain"].get("label", "dupr")
    method = cfg["pretrain"]["method"]
    arch = method["model"]["backbone"]
    data = {"data": cfg["pretrain"]["data"]}
    methods = {label: (f"pretrain{suffix}", method)}
    for name in cfg["baselines"].get("pretrain") or []:
        baseline = baseline_method(DUPRConfig.from_dict(method), name).to_dict()
        baseline = json.loads(json.dumps(baseline))  # plain values, as composed configs are
        methods[name] = (f"pretrain/{name}{suffix}", baseline)
    stages: list[Stage] = []
    inits: dict[str, Ref | None] = {}
    for init, (name, values) in methods.items():
        pretrain = Stage(name, "pretrain", _pretrain_slice(cfg, values), data)
        convert = Stage(
            f"convert/{init}{suffix}", "convert", {}, {"checkpoint": Ref(name, "checkpoint")}
        )
        stages += [pretrain, convert]
        inits[init] = Ref(convert.name, "torchvision")
    for name in cfg["baselines"].get("checkpoints") or {}:
        inits[name] = Ref(f"convert/{name}", "torchvision")
    if cfg["baselines"].get("random", True):
        inits["random"] = None

    # GPU "auto" becomes 1 per task when the cluster has GPUs, else 0 (see resolve_gpus).
    gpus = ev["resources"]["gpus"]
    resources = {
        "CPU": float(ev["resources"]["cpus"]),
        "GPU": gpus if gpus == "auto" else float(gpus),
    }
    det_data, cls_data = ev["data"]["detection"] or {}, ev["data"]["classification"] or {}
    # The analyses that feed the backbone views see them at the size it was pre-trained at,
    # unless set: the same size for every initialisation, so that their rows compare. (The
    # object probe reads the detection set's images as they are: ObjectProbeConfig.)
    pretrain_size = method["model"]["image_size"]
    sized = {
        kind: {**ev[kind], "image_size": ev[kind].get("image_size") or pretrain_size}
        for kind in ("correspondence", "probe")
    }
    for init, weights in inits.items():
        # Random initialisation has no weights file: the architecture comes from the config.
        base = {"init": init, "arch": arch if weights is None else None}
        for kind in ("spatial", "correspondence", "object_probe"):
            stages.append(
                Stage(
                    f"{kind}/{init}{suffix}",
                    kind,
                    {**base, **sized.get(kind, ev[kind])},
                    {"backbone": weights, **det_data},
                )
            )
        stages.append(
            Stage(
                f"probe/{init}{suffix}",
                "probe",
                {**base, **sized["probe"]},
                {"backbone": weights, **cls_data},
            )
        )
        for detector in ev["detection"]["detectors"]:
            stages.append(
                Stage(
                    f"detection/{detector}/{init}{suffix}",
                    "detection",
                    {**base, "detector": detector, **_without(ev["detection"], "detectors")},
                    {"backbone": weights, **det_data},
                    execution_only=frozenset(execution_only_fields(DetectionEvalConfig)),
                )
            )
    for stage in stages:
        if stage.kind in EVALUATIONS:
            stage.resources = dict(resources)  # resources are not part of a stage's key
    return stages


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


# ---------------------------------------------------------------------------------------------
# Preflight: every check that needs no cluster, then the cluster's resources


def preflight_pipeline(cfg: dict[str, Any]) -> list[Stage]:
    """Config, data, checkpoints, storage and tracking, each failure one line; the stages."""
    validate_pipeline(cfg)
    stages = build_stages(cfg)
    storage = open_storage(cfg["storage"])
    check_storage(storage)
    check_tracking(cfg["tracking_uri"])
    eval_stages.check_eval_data(cfg["eval"]["data"])
    for stage in stages:
        convert_stage.check_inputs(stage.kind, stage.inputs)
    return stages


def resolve_gpus(stages: list[Stage]) -> None:
    """`gpus: auto`: one GPU per evaluation task when the cluster has GPUs, none otherwise."""
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    for stage in stages:
        if stage.resources.get("GPU") == "auto":
            stage.resources["GPU"] = 1.0 if has_gpu else 0.0


def preflight_resources(cfg: dict[str, Any], stages: list[Stage], job: PretrainJob | None) -> None:
    """The connected cluster can ever run each stage: some node has what it asks for (a task
    that no node can place hangs)."""
    if job is not None:
        with field_prefix("pretrain."):
            preflight_cluster(job)
    largest = largest_node()
    for stage in stages:
        for resource, amount in stage.resources.items():
            if amount > largest.get(resource, 0):
                raise ConfigError(
                    f"eval.resources: stage {stage.name} needs {amount:g} {resource} on one "
                    f"node, the Ray cluster's largest node has {largest.get(resource, 0):g}"
                )


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class StageReport:
    name: str
    status: str  # "done", "cached", "failed", "skipped", "not selected"
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0  # its run (on its worker, for an evaluation)
    error: str = ""
    retryable: bool = True  # False: a retry cannot fix it (see dupr_platform.failures)
    waited: float = 0.0  # from its submission to its start: its resources, or a worker


@dataclass
class PipelineResult:
    parent_run_id: str
    reports: list[StageReport]
    records: dict[str, dict[str, Any]]
    # What a smoke run found would fail at full size, beyond failed stages.
    failures: list[str] = field(default_factory=list)
    # What the pipeline printed at its end: the summary table, a smoke run's report, results.
    summary: str = ""

    @property
    def ok(self) -> bool:
        done = all(r.status in ("done", "cached", "not selected") for r in self.reports)
        return done and not self.failures


# The body of each stage kind but pre-training (which is a Ray Train job of its own).
BODIES: dict[str, Callable[[StageContext, Path], StageOutput]] = {
    "convert": convert_stage.convert,
    "detection": eval_stages.detection,
    "spatial": eval_stages.spatial,
    "correspondence": eval_stages.correspondence,
    "probe": eval_stages.probe,
    "object_probe": eval_stages.object_probe,
}


def run_stage(ctx: StageContext) -> StageOutput:
    """Run the body, copy its folder to the stage's storage folder, log its artifacts."""
    began = time.monotonic()
    with scratch_folder("stage") as tmp:
        if ctx.profile and ctx.kind != "detection":  # a fine-tuning measures its own steps
            device = eval_stages.stage_device(ctx)
            with smoke.profiled(device) as measured:
                result = BODIES[ctx.kind](ctx, tmp)
            result.metrics.update(measured)
        else:
            result = BODIES[ctx.kind](ctx, tmp)
        open_storage(ctx.storage_uri).upload(tmp, ctx.folder)
        # The body's run is the driver's: its tags and artifacts, not its status. They wait for
        # a tracking server that cannot be reached, as the driver's calls do.
        client = patient_client(ctx.tracking_uri)
        # 0 unless Ray's low worker priority applied (see cluster.COMPUTE_PRIORITY).
        client.set_tag(ctx.run_id, "dupr.worker_niceness", str(os.nice(0)))
        client.set_tag(ctx.run_id, software.TAG, software.summary())  # this worker's
        for name in result.artifacts:
            client.log_artifact(ctx.run_id, str(tmp / name))
    result.seconds = time.monotonic() - began
    return result


# Which ready evaluations are submitted first (see _Runner.run); the others follow in plan order.
LAUNCH_ORDER = {"convert": 0, "detection": 1}

# A stage's worker process or node was lost, or Ray's memory monitor killed it to save the
# node: the runner launches the stage again, up to `eval.max_failures` times, and a detection
# fine-tuning resumes from its checkpoint (`_Runner.relaunch`). An error of the stage's own
# (RayTaskError) is not retried: it would fail the same way; the rerun resumes once it is fixed.
LOST_WORKER = (
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.OutOfMemoryError,
)
# On a stage's run that this invocation launched again: 2, 3, ...; a rerun that continues the
# run drops it until it launches the stage again.
ATTEMPT_TAG = "dupr.stage_attempt"
RELAUNCH_AFTER_S = 2.0  # after a lost worker: time for an interrupt of the driver to arrive
WAIT_CHECK_S = 10.0  # how often the runner looks for stages that no alive node can place
SHOWN_WAIT_S = 10.0  # a stage's wait to start said beside its run time from this long on


class NodeWaitTimeout(RuntimeError):
    """No node that can place a relaunched evaluation joined within `eval.node_wait_minutes`."""


# max_retries=0: the runner relaunches instead of Ray's task retries, which count a memory-
# monitor kill apart from max_retries (Ray's task_oom_retries, unbounded in some releases: a
# stage that cannot fit would be retried without end) and which neither the console nor the
# stage's MLflow run would show.
@ray.remote(max_retries=0)
def _stage_task(ctx: StageContext) -> StageOutput:
    """One stage body in its own Ray worker process, with as many threads as it has CPUs."""
    import torch

    torch.set_num_threads(max(1, int(ctx.cpus)))
    return run_stage(ctx)


class _Runner:
    def __init__(
        self,
        cfg: dict[str, Any],
        stages: list[Stage],
        parent: RunLogger,
        claims: Claims | SharedClaims | None = None,
        owner: str | None = None,
        tag: str = "pipeline",
    ) -> None:
        self.cfg = cfg
        self.tag = tag  # its console lines' `[pipeline]`, or a sweep trial's `[trial 0.3]`
        self.stages = {s.name: s for s in stages}
        self.storage = open_storage(cfg["storage"])
        self.parent = parent
        self.records: dict[str, dict[str, Any]] = {}
        self.reports: dict[str, StageReport] = {}
        self.loggers: dict[str, RunLogger] = {}
        self.started: dict[str, float] = {}
        self.tasks: dict[str, StageContext] = {}  # the submitted evaluations'
        self.relaunches: dict[str, int] = {}
        # What each running stage waits for, as last said, and since when (monotonic time).
        self.waiting: dict[str, tuple[str, float]] = {}
        self.checked_waiting = 0.0
        self.pretrain_need: dict[str, float] = {}  # the CPUs and GPUs of the pre-training at hand
        # What this pipeline holds of the cluster, beside what other pipelines sharing it hold
        # (a sweep's trials share the driver's), under `owner`; last stated: `published`.
        self.claims = claims or Claims()
        self.owner = owner or parent.run_id
        self.published: dict[str, float] | None = None
        # Beside a pre-training ([] while one runs, else None): the evaluations that lost their
        # worker and wait for room in the cluster as it is now to be launched again.
        self.held: list[Stage] | None = None
        self.said_refused: set[str] = set()  # the ready evaluations said to wait for room
        self.interrupted = threading.Event()  # Ctrl-C or SIGTERM while a pre-training held us
        self.pretrain_callbacks: list[Any] | None = None
        self.tuned = next(s.name for s in stages if s.kind == "pretrain")

    # -- MLflow child runs ----------------------------------------------------------------

    @staticmethod
    def stage_tags(stage: Stage, cache_hit: bool = False) -> dict[str, str]:
        return {
            "dupr.stage": stage.name,
            "dupr.stage_kind": stage.kind,
            "dupr.stage_key": stage.key,
            CACHE_HIT_TAG: str(cache_hit).lower(),
        }

    def child_run(self, stage: Stage, cache_hit: bool, run_id: str | None = None) -> RunLogger:
        """The stage's MLflow run under this pipeline's: a new one, or `run_id` continued
        (moved under this parent; a new one if that run was deleted)."""
        start = functools.partial(
            RunLogger.start,
            self.cfg["tracking_uri"],
            self.cfg["experiment"],
            f"{self.parent.run_id}:{stage.name}",
            tags={"mlflow.runName": stage.name, **self.stage_tags(stage, cache_hit)},
            parent_run_id=self.parent.run_id,
            stale_tags=(ATTEMPT_TAG,),  # counts the launches of one invocation
        )
        try:
            run = start(run_id=run_id)
        except RunGone as exc:  # deleted (not unreachable: a new run would wait all again)
            log.warning("%s: not continuing MLflow run %s (%s)", stage.name, run_id, exc)
            run = start()
        # Settings that may change between a run and its continuation are not params (MLflow's
        # are immutable); stage.json has them.
        run.log_params({"stage": stage.defining_config(), "inputs": _shown_inputs(stage)})
        run.log_dict({"config": stage.config, "inputs": _shown_inputs(stage)}, "stage.json")
        return run

    def record_cache_hit(self, stage: Stage, record: dict[str, Any]) -> None:
        self.end_completed_run(record)
        run = self.child_run(stage, cache_hit=True)
        run.set_tag("dupr.cached_from_run", record.get("run_id", ""))
        run.set_tag("dupr.outputs", _short_json(record["outputs"]))
        run.log_metrics(0, record["metrics"])
        run.end("FINISHED")
        self.records[stage.name] = record
        self.reports[stage.name] = StageReport(stage.name, "cached", record["metrics"], run.run_id)
        print(f"[{self.tag}] {stage.name}: cache hit ({stage.folder})", flush=True)

    def end_completed_run(self, record: dict[str, Any]) -> None:
        """The run that completed a stage (its marker's) FINISHED, with its outputs: its driver
        died, or lost the tracking server for good, between writing the marker and ending
        the run (and `recovery.close_orphans` may have ended it KILLED since)."""
        client, run_id = self.parent.client, str(record.get("run_id") or "")
        try:
            run = client.get_run(run_id) if run_id else None
        except MlflowException:
            return  # deleted for good, or another tracking server's
        if run is None or run.info.status == "FINISHED" or run.info.lifecycle_stage == "deleted":
            return
        try:
            client.set_tag(run_id, "dupr.outputs", _short_json(record["outputs"]))
            if CONTINUED_BY_TAG in run.data.tags:  # nothing of it was left to carry on
                client.delete_tag(run_id, CONTINUED_BY_TAG)
            client.set_terminated(run_id, status="FINISHED")
        except MlflowException as exc:
            log.warning("MLflow run %s not ended (%s)", run_id, unreachable_reason(exc))
            return
        log.info("MLflow run %s: %s, its stage complete; ended FINISHED", run_id, run.info.status)

    # -- execution -----------------------------------------------------------------------------

    def context(self, stage: Stage, run_id: str) -> StageContext:
        return StageContext(
            name=stage.name,
            kind=stage.kind,
            key=stage.key,
            config=stage.config,
            inputs=resolve_inputs(stage, self.records),
            storage_uri=self.storage.uri,
            folder=stage.folder,
            run_id=run_id,
            tracking_uri=self.cfg["tracking_uri"],
            experiment=self.cfg["experiment"],
            cpus=stage.resources.get("CPU", 1.0),
            gpus=stage.resources.get("GPU", 0.0),
            profile=bool(self.cfg.get("smoke")),
        )

    def finish(self, stage: Stage, inputs: dict[str, Any], out: StageOutput, run_id: str) -> None:
        outputs = {k: self.storage.uri_for(stage.folder, f) for k, f in out.files.items()}
        outputs.update(out.values)
        record = write_marker(self.storage, stage, inputs, outputs, out.metrics, run_id)
        self.storage.delete(f"{stage.folder}/{RESUME_DIR}", recursive=True)  # complete now
        self.records[stage.name] = record
        since_submitted = time.monotonic() - self.started[stage.name]
        seconds = out.seconds or since_submitted
        waited = max(0.0, since_submitted - seconds)  # its worker's clock may run apart
        self.reports[stage.name] = StageReport(
            stage.name, "done", out.metrics, run_id, seconds, waited=waited
        )
        shown = f" (waited {format_duration(waited)} to start)" if waited >= SHOWN_WAIT_S else ""
        print(f"[{self.tag}] {stage.name}: done in {format_duration(seconds)}{shown}", flush=True)

    def fail(self, stage: Stage, exc: BaseException, note: str = "") -> None:
        message = _one_line(exc) + note
        log.debug("stage %s failed:\n%s", stage.name, "".join(traceback.format_exception(exc)))
        run = self.loggers.pop(stage.name, None)
        if run is not None:
            try:  # waits for a tracking server that cannot be reached, then says so
                run.set_tag(ERROR_TAG, message[:5000])
                run.end("FAILED")
            except Exception as why:
                message += f" (its MLflow run {run.run_id} could not be ended: "
                message += f"{unreachable_reason(why)})"
        seconds = time.monotonic() - self.started.get(stage.name, time.monotonic())
        self.reports[stage.name] = StageReport(
            stage.name,
            "failed",
            {},
            run.run_id if run else None,
            seconds,
            message,
            retryable=not _retry_cannot_fix(exc),
        )
        print(f"[{self.tag}] {stage.name}: FAILED: {message}", flush=True)

    def run_pretrain(
        self,
        stage: Stage,
        pending: list[Stage],
        running: dict[ray.ObjectRef, Stage],
        spare: dict[str, float] | None,
    ) -> None:
        """Pre-train (Ray Train's fit() holds this thread); meanwhile collect `running` and
        launch the evaluations this makes ready in what the pre-training leaves `spare`."""
        job = absolute_locations(pretrain_job(self.cfg, stage))
        job.parent_run_id = self.parent.run_id
        self.started[stage.name] = time.monotonic()
        # A sweep's Tune callbacks follow the model's pre-training (the first seed's) only:
        # its scheduler reads one loss curve per trial.
        callbacks = self.pretrain_callbacks if stage.name == self.tuned else None
        reservation = None
        try:
            with self.collecting(pending, running, spare):
                reservation = self.wait_to_start(stage, job)
                began = time.monotonic()
                print(f"[{self.tag}] {stage.name}: pre-training ({job.name})", flush=True)
                result = run_pretraining(
                    job,
                    callbacks,
                    tags=self.stage_tags(stage),
                    waits_for_room=False,
                    reservation=reservation,
                )
        except Exception as exc:  # reported, and the pipeline goes on
            self.fail(stage, exc)
            return
        finally:
            self.claims.forget_wait(self.owner)  # also where it failed before `wait_to_start`
            StartLine.release_now(reservation)  # also where it failed before `run_pretraining`
            self.pretrain_need = {}  # its workers' resources are given back
            self.publish(running)
        # The run's last value of each metric (loss, accuracies, throughput) and Ray's counters.
        metrics = self.parent.patient_client.get_run(result.run_id).data.metrics
        metrics.update({k: float(v) for k, v in result.metrics.items() if _is_number(v)})
        out = StageOutput(
            files={},
            values={"checkpoint": result.checkpoint_uri},
            metrics=dict(metrics),
            seconds=time.monotonic() - began,
        )
        self.finish(stage, {"data": job.data}, out, result.run_id)

    def wait_to_start(self, stage: Stage, job: PretrainJob) -> str:
        """Wait until the cluster has room for `stage`'s pre-training `job` (`wait_for_room`),
        in the line of the pipelines that share this one's claims (a sweep's trials); the key
        of the room reserved for it."""

        def say(room: dict[str, float]) -> None:
            others = self.claims.others(self.owner)
            held = f"; the pipelines sharing it hold {amounts(others)}"
            print(
                f"[{self.tag}] {stage.name}: waits to start until the cluster has room "
                f"for its {amounts(self.pretrain_need)} ({amounts(room)} free now"
                f"{held if any(others.values()) else ''})",
                flush=True,
            )

        return wait_for_room(self.claims, self.owner, self.pretrain_need, say, start_lapse_s(job))

    @contextlib.contextmanager
    def collecting(
        self,
        pending: list[Stage],
        running: dict[ray.ObjectRef, Stage],
        spare: dict[str, float] | None,
    ) -> Iterator[None]:
        """Collect the evaluations in `running` as they end, from a second thread, while this
        one is held (by a pre-training): a result is recorded when it is ready, not hours
        later (a driver that dies meanwhile would lose it), a lost worker's stage is launched
        again once the cluster as it is now has room for it (`relaunch`), and the evaluations
        that become ready are launched in `spare` (None: none is; a smoke run's pre-training
        runs alone), which an ended stage gives its resources back to, and where they `claim`
        room; one that did not fit is tried again as stages end and every WAIT_CHECK_S (other
        pipelines give room back too). Only that thread touches the runner's state until it is
        stopped."""
        stop = threading.Event()
        self.held = None if spare is None else []

        def collect_until_stopped() -> None:
            nonlocal spare
            tried = time.monotonic()
            try:
                while not stop.is_set():
                    self.publish(running)
                    self.release_held(running)
                    # Ready evaluations that did not fit: tried again as this pipeline's
                    # stages end and every WAIT_CHECK_S (as other pipelines give room back).
                    waiting = spare is not None and any(
                        s.kind != "pretrain" for s in self.ready(pending)
                    )
                    if not (running or self.held or waiting):
                        break
                    gone = []  # the stages that gave their resources back
                    if running:
                        ended, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                        for ref in ended:
                            stage = running.pop(ref)
                            self.collect(ref, stage, running)
                            if stage not in running.values():  # else launched again
                                gone.append(stage)
                        gone += self.note_waiting(running)
                    else:
                        stop.wait(1.0)
                    if spare is None:
                        continue
                    for stage in gone:
                        asks = self.asks(stage)
                        spare = {k: spare[k] + asks[k] for k in spare}
                    again = time.monotonic() - tried >= WAIT_CHECK_S
                    if (gone or again) and not (stop.is_set() or self.interrupted.is_set()):
                        tried = time.monotonic()
                        spare = self.launch_ready(pending, running, spare)
            except Exception:  # Ray going down with the driver (Ctrl-C): the loop ends
                log.debug("collecting stopped:\n%s", traceback.format_exc())

        collector = threading.Thread(target=collect_until_stopped, name="dupr-collect")
        collector.start()
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (dupr_platform.cli)
            self.interrupted.set()
            raise
        finally:
            stop.set()
            collector.join()
            if not self.interrupted.is_set():  # the pre-training has ended: all of them now
                self.release_held(running, room=False)
            self.held = None

    def launch(self, stage: Stage) -> ray.ObjectRef:
        # A stage with a resume state (a fine-tuning's) continues the MLflow run that saved it.
        run = self.child_run(stage, False, resume_run(self.storage, stage.folder))
        self.loggers[stage.name] = run
        ctx = self.tasks[stage.name] = self.context(stage, run.run_id)
        self.started[stage.name] = time.monotonic()
        print(f"[{self.tag}] {stage.name}: submitted ({_resources(stage)})", flush=True)
        return self.submit(stage, ctx)

    @staticmethod
    def submit(stage: Stage, ctx: StageContext) -> ray.ObjectRef:
        return _stage_task.options(
            name=stage.name,  # Ray's task name: its dashboard and the worker's process title
            num_cpus=stage.resources.get("CPU", 1.0),
            num_gpus=stage.resources.get("GPU", 0.0),
            runtime_env={"env_vars": forwarded_env() | COMPUTE_PRIORITY},
            # Outside any placement group of the caller (a Tune trial reserves only its own
            # driver's CPU): the stage asks the cluster for its own resources.
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        ).remote(ctx)

    def relaunch(
        self, stage: Stage, exc: BaseException, running: dict[ray.ObjectRef, Stage]
    ) -> bool:
        """Launch `stage` again after its worker or node was lost (`LOST_WORKER`), in the same
        MLflow run (beside a pre-training, once the cluster has room for it: `held`); False
        once it was relaunched `eval.max_failures` times."""
        done = self.relaunches.get(stage.name, 0)
        limit = int(self.cfg["eval"]["max_failures"])
        if done >= limit:
            return False
        self.relaunches[stage.name] = done + 1
        self.loggers[stage.name].set_tag(ATTEMPT_TAG, done + 2)
        # Ray's first two sentences say what happened and where (the node's IP, its memory
        # use); the rest, how to look into it, is in Ray's own output (its log file).
        cause = " ".join(re.split(r"(?<=\.)\s+", _one_line(exc))[:2]).rstrip(".")
        again = f"({done + 1} of {limit})"
        # After a lost node, the pre-training's restarted workers wait for its resources too:
        # launched at once, the stage could take them (Ray places whichever asked first), and
        # the pre-training would wait for it, hours for a fine-tuning, or time out.
        if self.held is not None and not self.claim(stage, running):
            self.held.append(stage)
            print(
                f"[{self.tag}] {stage.name}: lost its worker ({cause}); to be launched again "
                f"{again} once the cluster has room for it beside the pre-training",
                flush=True,
            )
            return True
        print(
            f"[{self.tag}] {stage.name}: lost its worker ({cause}); launched again {again}",
            flush=True,
        )
        self.started[stage.name] = time.monotonic()
        running[self.submit(stage, self.tasks[stage.name])] = stage
        return True

    def release_held(self, running: dict[ray.ObjectRef, Stage], room: bool = True) -> None:
        """Launch the held relaunches that fit the cluster's room now (all: `room=False`)."""
        held = self.held or []
        for stage in list(held):
            if room and not self.claim(stage, running):
                continue
            held.remove(stage)
            print(f"[{self.tag}] {stage.name}: launched again", flush=True)
            self.started[stage.name] = time.monotonic()
            running[self.submit(stage, self.tasks[stage.name])] = stage

    def run(self, plan: list[Stage]) -> None:
        pending = list(plan)
        running: dict[ray.ObjectRef, Stage] = {}
        last_beat = time.monotonic()
        while pending or running:
            ready = self.ready(pending)
            pretrain = next((s for s in ready if s.kind == "pretrain"), None)
            # A smoke run times each pre-training alone: it waits for the running stages.
            alone = pretrain is not None and bool(self.cfg.get("smoke"))
            # Otherwise the evaluations that fit beside a pre-training are submitted before it,
            # since it holds this loop until it ends (Ray Train's fit() blocks): on 2 CPU cores
            # the random backbone's fine-tuning runs beside the pre-trainings, not after them.
            # Only what the pre-training leaves free: queued, they could take the cores or GPUs
            # its workers wait for. Conversions (others wait on them) go first, then the long
            # detection fine-tunings.
            if pretrain is not None:
                spare = self.spare(pretrain, running)
            elif isinstance(self.claims, SharedClaims):
                # A sweep's trial past its pre-trainings: its evaluations take room the other
                # trials' claims leave (not their waiting pre-trainings', which these go
                # before), so none lands in what a pre-training that just started waits for.
                spare = dict.fromkeys(KINDS, math.inf)
            else:
                spare = None  # the cluster's own queue decides
            if not alone:
                spare = self.launch_ready(pending, running, spare, pretrain is None)
            self.publish(running)
            if pretrain is not None and not (alone and running):
                pending.remove(pretrain)
                self.run_pretrain(pretrain, pending, running, None if alone else spare)
                # What finished meanwhile, then the stages this pre-training made ready.
                if running:
                    done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
                    for ref in done:
                        self.collect(ref, running.pop(ref), running)
                continue
            if not running:
                if pending and not any(
                    all(u in self.records for u in s.upstream()) for s in pending
                ):
                    break  # nothing can make progress (upstream neither done nor failed)
                if self.ready(pending):  # evaluations that wait for room
                    time.sleep(WAIT_CHECK_S)
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_CHECK_S)
            if finished:
                self.collect(finished[0], running.pop(finished[0]), running)
            self.note_waiting(running)
            if not finished and running and time.monotonic() - last_beat > 60:
                last_beat = time.monotonic()
                print(f"[{self.tag}] {self.running_line(running)}", flush=True)

    def running_line(self, running: dict[ray.ObjectRef, Stage]) -> str:
        """`running: A (4m07s), B (20s); queued: C (2m27s)`: how long each stage has run, or
        has waited for its resources (or a worker) since it was submitted. Where Ray cannot
        say which run (`task_starts`), all are listed as running since their submission."""
        now, wall = time.monotonic(), time.time()
        starts = task_starts(running)
        runs, queued = [], []
        for ref, stage in running.items():
            submitted = format_duration(now - self.started[stage.name])
            if starts is None:
                runs.append(f"{stage.name} ({submitted})")
            elif ref in starts:
                runs.append(f"{stage.name} ({format_duration(wall - starts[ref])})")
            else:
                queued.append(f"{stage.name} ({submitted})")
        parts = [f"running: {', '.join(runs)}"] if runs else []
        parts += [f"queued: {', '.join(queued)}"] if queued else []
        return "; ".join(parts)

    def launch_ready(
        self,
        pending: list[Stage],
        running: dict[ray.ObjectRef, Stage],
        spare: dict[str, float] | None,
        past_pretraining: bool = False,
    ) -> dict[str, float] | None:
        """Launch the ready evaluations into `running`: all of them, or those that fit in
        `spare` (what a pre-training leaves free) and in the cluster as it is now (`claim`);
        what is left of `spare`. Past its pre-trainings (`past_pretraining`) an evaluation
        goes before the pre-trainings that wait in the shared line, and one that no node could
        place is launched all the same (Ray holds it, `note_waiting` says so)."""
        evaluations = [s for s in self.ready(pending) if s.kind != "pretrain"]
        refused = []
        largest = largest_node() if spare is not None and past_pretraining else {}
        for stage in sorted(evaluations, key=lambda s: LAUNCH_ORDER.get(s.kind, len(LAUNCH_ORDER))):
            if spare is not None:
                asks = self.asks(stage)
                unplaceable = past_pretraining and any(asks[k] > largest.get(k, 0.0) for k in KINDS)
                if not unplaceable and (
                    any(asks[k] > spare[k] for k in spare)
                    or not self.claim(stage, running, before_waiting=past_pretraining)
                ):
                    refused.append(stage)  # once resources are given back, or after it
                    continue
                spare = {k: spare[k] - asks[k] for k in spare}
            pending.remove(stage)
            try:
                running[self.launch(stage)] = stage
            except Exception as exc:
                self.fail(stage, exc)
        # Said once per stage: a pre-training's console is quiet about what waits beside it.
        unsaid = [s for s in refused if s.name not in self.said_refused]
        if unsaid:
            self.said_refused.update(s.name for s in unsaid)
            names = ", ".join(f"{s.name} ({_resources(s)})" for s in unsaid)
            beside = (
                "beside what the pipelines sharing the cluster hold"
                if past_pretraining
                else "beside the pre-training"
            )
            print(f"[{self.tag}] to launch once there is room {beside}: {names}", flush=True)
        return spare

    @staticmethod
    def asks(stage: Stage) -> dict[str, float]:
        """What `stage` takes of the CPUs and GPUs (a CPU unless it says otherwise)."""
        return {k: stage.resources.get(k, 1.0 if k == "CPU" else 0.0) for k in KINDS}

    def holding(self, running: dict[ray.ObjectRef, Stage]) -> dict[str, float]:
        """What this pipeline holds of the cluster, or is about to: its pre-training's workers
        while one runs, and its running (or queued) evaluations."""
        held = dict(self.pretrain_need)
        for stage in running.values():
            held = add(held, self.asks(stage))
        return held

    def claim(
        self, stage: Stage, running: dict[ray.ObjectRef, Stage], before_waiting: bool = False
    ) -> bool:
        """Whether `stage` fits in the CPUs and GPUs of the cluster's alive nodes beside what
        this pipeline holds and what other pipelines sharing the cluster hold (a sweep's other
        trials, their pre-trainings included before Ray places them; `before_waiting`: but
        those that wait to start), and in what is free now beyond the placement groups that
        wait (another job's pre-training); if it does, it is counted as held. `spare` counts
        what ended stages give back, which is right while the cluster keeps its size and nobody
        else launches; after a node is lost, or beside other pipelines, it is too much:
        evaluations launched into it would take what a pre-training's (restarted) workers wait
        for."""
        asks = self.asks(stage)
        if any(asks[k] > v for k, v in room_beside_waiting().items()):
            return False
        holding = add(self.holding(running), asks)
        total = ray.cluster_resources()
        if not self.claims.claim(self.owner, holding, total, before_waiting):
            return False
        self.published = holding
        return True

    def publish(self, running: dict[ray.ObjectRef, Stage]) -> None:
        """State what this pipeline holds now (a pre-training begun or ended, a stage ended),
        for the other pipelines' `claim`."""
        holding = self.holding(running)
        if holding != self.published:
            self.claims.hold(self.owner, holding)
            self.published = holding

    def note_waiting(self, running: dict[ray.ObjectRef, Stage]) -> list[Stage]:
        """Say (once) that a running stage waits because no alive node has what it asks: a
        node was lost, and until one that fits joins (an autoscaler's, or one the user
        starts), the stage cannot be placed. After `eval.node_wait_minutes` of that, the stage
        leaves `running` as failed (the rerun resumes it); those stages. Every WAIT_CHECK_S at
        most."""
        now = time.monotonic()
        if now - self.checked_waiting < WAIT_CHECK_S:
            return []
        self.checked_waiting = now
        largest = largest_node()
        limit_s = 60.0 * float(self.cfg["eval"]["node_wait_minutes"])
        given_up = []
        for ref, stage in list(running.items()):
            lacking = " and ".join(
                f"{v:g} {k}" for k, v in stage.resources.items() if v > largest.get(k, 0)
            )
            if not lacking:
                self.waiting.pop(stage.name, None)
                continue
            said, since = self.waiting.get(stage.name, ("", now))
            if said != lacking:
                print(
                    f"[{self.tag}] {stage.name}: waits for a node with {lacking} "
                    "(no node of the cluster has them now)",
                    flush=True,
                )
            self.waiting[stage.name] = (lacking, since)
            if now - since >= limit_s:
                # Not yet placed, Ray drops the task; placed since the check (a node joined just
                # now), it is interrupted as by Ctrl-C. Its checkpoint stays for the rerun.
                ray.cancel(ref)
                del running[ref]
                del self.waiting[stage.name]
                minutes = f"{limit_s / 60:g} min (eval.node_wait_minutes)"
                self.fail(stage, NodeWaitTimeout(f"no node with {lacking} joined within {minutes}"))
                given_up.append(stage)
        return given_up

    def spare(self, pretrain: Stage, running: dict[ray.ObjectRef, Stage]) -> dict[str, float]:
        """The CPUs and GPUs free now beyond what `pretrain` will take (held from now on)."""
        job = pretrain_job(self.cfg, pretrain)
        need = self.pretrain_need = pretraining_needs(job)
        self.publish(running)
        self.claims.want(self.owner, pretraining_bundles(job))  # in line (`wait_to_start`)
        free = ray.available_resources()
        return {k: free.get(k, 0.0) - need[k] for k in KINDS}

    def ready(self, pending: list[Stage]) -> list[Stage]:
        """The pending stages whose upstream is complete; those with a failed upstream leave
        `pending` as skipped."""
        ready = []
        for stage in list(pending):
            upstream = stage.upstream()
            if any(self.reports.get(u, StageReport(u, "")).status == "failed" for u in upstream):
                pending.remove(stage)
                self.reports[stage.name] = StageReport(
                    stage.name, "skipped", error="an upstream stage failed"
                )
            elif all(u in self.records for u in upstream):
                ready.append(stage)
        return ready

    def collect(
        self, ref: ray.ObjectRef, stage: Stage, running: dict[ray.ObjectRef, Stage]
    ) -> None:
        """A finished evaluation task: its outputs recorded and its MLflow run ended, or
        launched again into `running` if its worker was lost."""
        try:
            out = ray.get(ref)
        except LOST_WORKER as exc:
            # Ctrl-C reaches the stage's worker too: a worker lost as the driver is interrupted
            # is left to the driver, which ends the stage's run KILLED (the main thread's
            # KeyboardInterrupt lands in this wait; the collecting thread sees `interrupted`).
            if self.interrupted.wait(RELAUNCH_AFTER_S):
                return
            if not self.relaunch(stage, exc, running):
                times = self.relaunches.get(stage.name, 0)
                self.fail(stage, exc, f" (after {times} relaunches)" if times else "")
            return
        except Exception as exc:
            self.fail(stage, exc)
            return
        run = self.loggers.pop(stage.name)
        try:
            self.finish(stage, self.tasks[stage.name].inputs, out, run.run_id)
        except Exception as exc:
            self.loggers[stage.name] = run
            self.fail(stage, exc)
            return
        # The stage is complete (its marker is written); what follows records it in MLflow,
        # waiting for a tracking server that cannot be reached, and never undoes it.
        report = self.reports[stage.name]
        # The run's own duration in MLflow counts from its launch, its wait to start included.
        took = {"stage/seconds": report.seconds, "stage/waited_seconds": report.waited}
        try:
            run.log_metrics(0, {**out.metrics, **took})
            run.set_tag("dupr.outputs", _short_json(self.records[stage.name]["outputs"]))
            run.end("FINISHED")
        except Exception as exc:
            print(
                f"[{self.tag}] {stage.name}: its MLflow run {run.run_id} could not be ended "
                f"({unreachable_reason(exc)}); the stage's outputs are complete",
                flush=True,
            )


def plan_stages(
    cfg: dict[str, Any], stages: list[Stage], storage_uri: str
) -> tuple[list[Stage], list[tuple[Stage, dict[str, Any]]], list[Stage]]:
    """(to run, cache hits with their records, not selected)."""
    kinds = set(selected_kinds(cfg["stages"]))
    storage = open_storage(storage_uri)
    to_run, hits, unselected = [], [], []
    for stage in stages:
        record = read_marker(storage, stage)
        if record is not None:
            hits.append((stage, record))
        elif stage.kind in kinds:
            to_run.append(stage)
        else:
            unselected.append(stage)
    # A selected stage may only depend on stages that run now or are complete.
    available = {s.name for s in to_run} | {s.name for s, _ in hits}
    for stage in to_run:
        for u in stage.upstream():
            if u not in available:
                raise ConfigError(
                    f"stages: {stage.name} needs the outputs of {u}, which is neither selected "
                    f"nor cached (add {u.split('/')[0]!r} to stages)"
                )
    return to_run, hits, unselected


def run_pipeline(
    cfg: dict[str, Any],
    parent_run_id: str | None = None,
    run_key: str | None = None,
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    pretrain_callbacks: list[Any] | None = None,
    print_summary: bool = True,
    claims: SharedClaims | None = None,
    console_tag: str = "pipeline",
) -> PipelineResult:
    """Check, then run the study on the connected (or a local) Ray cluster.

    A sweep runs one pipeline per trial: `parent_run_id` nests this pipeline's MLflow run under
    the sweep's, `run_key` makes a retried trial continue its run, `params` add the trial's
    grid value, `pretrain_callbacks` reach the pre-training's TorchTrainer (Tune reports) and
    `claims` (the sweep's, under `run_key`) keeps the trials that run at once from launching
    evaluations into the same room, and `console_tag` tells their console lines apart
    (`[trial 0.3] pretrain: done in 21s`).
    A trial leaves its `PipelineResult.summary` to the sweep's driver to print
    (`print_summary=False`): Ray forwards a worker's stdout asynchronously, and the last lines
    of a trial that ends just before its driver can be lost.
    """
    cfg = study = _absolute(cfg)
    if study.get("smoke"):
        cfg = smoke.prepare(study)
    stages = preflight_pipeline(cfg)
    if study.get("smoke"):  # its batch and data follow the cluster's devices
        if start_ray("pipeline"):
            check_nodes(cfg["storage"], cfg["tracking_uri"])
        cfg = smoke.fit(cfg, ray.cluster_resources())
        stages = preflight_pipeline(cfg)
    to_run, hits, unselected = plan_stages(cfg, stages, cfg["storage"])
    jobs = [absolute_locations(pretrain_job(cfg, s)) for s in to_run if s.kind == "pretrain"]
    job = jobs[0] if jobs else None
    with field_prefix("pretrain."):
        for other in jobs[1:]:  # the same settings and data, another seed or loss
            other.validate()
        if job is not None:
            preflight_config(job)  # its data too, before anything starts
    if to_run:  # a rerun with nothing to do does not start Ray
        if start_ray("pipeline"):
            check_nodes(cfg["storage"], cfg["tracking_uri"])
        resolve_gpus(stages)
        preflight_resources(cfg, [s for s in to_run if s.kind != "pretrain"], job)

    parent = RunLogger.start(
        cfg["tracking_uri"],
        cfg["experiment"],
        run_key or f"{cfg['name']}:{time.strftime('%Y%m%dT%H%M%S')}:{os.getpid()}",
        tags={"mlflow.runName": run_name or cfg["name"], PIPELINE_TAG: cfg["name"]},
        parent_run_id=parent_run_id,
    )
    runner = _Runner(cfg, stages, parent, claims, run_key, console_tag)
    runner.pretrain_callbacks = pretrain_callbacks
    with driving(parent, PIPELINE_TAG, cfg["name"], console_tag):
        parent.log_params({**cfg, **(params or {})})
        parent.log_dict(redact_tree(cfg), "config/resolved.json")
        parent.set_tag(software.TAG, software.summary())
        parent.log_text(software.installed(), software.ARTIFACT)
        print(
            f"[{console_tag}] {cfg['name']}: {len(to_run)} stages to run, {len(hits)} cached, "
            f"{len(unselected)} not selected; MLflow parent run {parent.run_id}",
            flush=True,
        )
        try:
            for stage, record in hits:
                runner.record_cache_hit(stage, record)
            for stage in unselected:
                runner.reports[stage.name] = StageReport(stage.name, "not selected")
            runner.run(to_run)
        except BaseException as exc:  # the stage runs still open end with the parent
            for run in runner.loggers.values():
                run.abandon("FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
        finally:
            with contextlib.suppress(Exception):  # Ray going down with the driver
                runner.claims.forget(runner.owner)
        for stage in to_run:
            runner.reports.setdefault(stage.name, StageReport(stage.name, "skipped"))
        result = PipelineResult(
            parent.run_id, [runner.reports[s.name] for s in stages], runner.records
        )
        results = report.report(cfg, stages, runner.records, parent, key_columns(cfg))
        table = summary_table(result, cfg)
        parent.log_text(table + "\n", "summary.md")
        shown = [table]
        if study.get("smoke"):
            text, result.failures = smoke.report(study, result.reports)
            parent.log_text(text + "\n", "smoke.md")
            shown += ["", text]
        if results:  # its captions as the pipeline's own lines, its tables as they are
            shown += [""]
            shown += [
                f"[{console_tag}] {x}" if x and not x.startswith("|") else x
                for x in results.split("\n")
            ]
        result.summary = "\n".join(shown)
        if print_summary:
            print(result.summary, flush=True)
        _log_console(parent)
    parent.end("FINISHED" if result.ok else "FAILED")
    return result


def _log_console(parent: RunLogger) -> None:
    """The driver's log file (Ray's output, secrets scrubbed) as an artifact of the run."""
    path = console.log_path()
    if path is not None and path.is_file():
        parent.log_artifact(path, "logs")


# ---------------------------------------------------------------------------------------------
# Summary


def run_link(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI address of a run on a tracking server; else the run id."""
    if not run_id:
        return ""
    if experiment_id is not None:
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id}"


KEY_METRICS = {
    "pretrain": ("loss",),
    "convert": ("parameters",),
    "detection": ("bbox/AP", "bbox/AP50", "bbox/AP75", "voc/AP"),
    "spatial": ("slope",),
    "correspondence": ("accuracy",),
    "probe": ("conv2", "conv3", "conv4", "conv5"),
    "object_probe": ("conv2", "conv3", "conv4", "conv5"),
}


# The results table on the console (results.md has every metric): one or two per evaluation.
RESULT_COLUMNS = {
    "detection": ("bbox/AP", "bbox/AP50"),
    "spatial": ("slope",),
    "correspondence": ("conv4/exact", "conv5/exact"),
    "probe": ("conv4", "conv5"),
    "object_probe": ("conv4", "conv5"),
}


def key_columns(cfg: dict[str, Any]) -> list[str]:
    """The results table's columns on the console, in the order of `RESULT_COLUMNS`."""
    detectors = cfg["eval"]["detection"]["detectors"]
    columns = []
    for kind, metrics in RESULT_COLUMNS.items():
        for prefix in [f"{kind}/{d}" for d in detectors] if kind == "detection" else [kind]:
            columns += [f"{prefix}/{m}" for m in metrics]
    return columns


def summary_table(result: PipelineResult, cfg: dict[str, Any]) -> str:
    uri = cfg["tracking_uri"]
    experiment_id = None  # every stage run is in the pipeline's experiment: one lookup
    if uri.startswith(("http://", "https://")):
        experiment = patient_client(uri).get_experiment_by_name(cfg["experiment"])
        experiment_id = experiment.experiment_id if experiment else None
    rows = []
    for r in result.reports:
        kind = r.name.split("/")[0]
        shown = [f"{k} {r.metrics[k]:.4g}" for k in KEY_METRICS.get(kind, ()) if k in r.metrics]
        error = r.error if len(r.error) <= 90 else r.error[:87] + "..."
        status = r.status + (f": {error}" if error else "")
        rows.append(
            [
                r.name,
                status,
                "yes" if r.status == "cached" else "no",
                ", ".join(shown),
                run_link(uri, experiment_id, r.run_id),
            ]
        )
    head = ["stage", "status", "cache hit", "key metrics", "MLflow run"]
    return markdown_table(rows, head, pad=True)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _absolute(cfg: dict[str, Any]) -> dict[str, Any]:
    """Local paths resolved against the driver's directory (Ray tasks run elsewhere)."""
    cfg = dict(cfg)
    if "://" not in cfg["storage"]:
        cfg["storage"] = os.path.abspath(cfg["storage"])
    cfg["tracking_uri"] = absolute_tracking_uri(cfg["tracking_uri"])
    cfg["eval"] = eval_stages.absolute_data(cfg["eval"])
    cfg["baselines"] = dict(cfg["baselines"])
    cfg["baselines"]["checkpoints"] = {
        k: v if "://" in v else os.path.abspath(v)
        for k, v in (cfg["baselines"].get("checkpoints") or {}).items()
    }
    return cfg


def _shown_inputs(stage: Stage) -> dict[str, Any]:
    return {
        k: (f"{v.stage}:{v.output}" if isinstance(v, Ref) else v) for k, v in stage.inputs.items()
    }


def _short_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True)
    return text if len(text) < 4900 else text[:4900] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _one_line(exc: BaseException) -> str:
    # Ray wraps task errors; the cause's own message is what the user needs.
    cause = getattr(exc, "cause", None) or exc
    # Our own errors are phrased for the user and name a cause and a checkpoint URI.
    if isinstance(cause, ConfigError | UnrecoverableError):
        return one_line(cause, limit=1000)
    lines = [line for line in str(cause).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in lines[0]:  # a task error whose cause did not arrive
        return one_line(cause, keep_line=lambda _: True, limit=500)  # its last line
    # Anything else says what it is.
    return f"{type(cause).__name__}: {one_line(cause)}"[:500]


def _retry_cannot_fix(exc: BaseException) -> bool:
    """Whether the error is the input's own (a broken image, a setting) or one the platform
    already judged final (`UnrecoverableError`): a sweep's trial then ends without Tune's
    retries, which would run the stage again only to fail the same way."""
    cause = getattr(exc, "cause", None) or exc  # Ray wraps a task's error
    return isinstance(cause, UnrecoverableError | ConfigError | ImageDecodeError)


def _resources(stage: Stage) -> str:
    return amounts(stage.resources, list(stage.resources))


__all__ = [
    "PipelineResult",
    "StageReport",
    "build_stages",
    "run_pipeline",
    "summary_table",
]
