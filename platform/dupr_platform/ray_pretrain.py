"""DUPR pre-training on Ray Train (V2): DDP workers, checkpoints in object storage, MLflow.

The driver (`run_pretraining`) checks everything that can be checked before any worker starts
(`preflight`), opens or continues the MLflow run, and fits a `TorchTrainer` whose per-worker
function (`train_worker`) is the plain `dupr.train` loop with three hooks:

- after every epoch, rank 0 writes the complete training state (model with memory banks,
  optimizer, schedule, scaler, epoch/step, every rank's random generators) into a checkpoint
  directory and `ray.train.report`s it; Ray uploads it to the run's storage and only then
  counts it, so a crash mid-write never produces a broken "latest". The upload runs beside
  the next epoch (`report_checkpoint`); the last one before fit() returns;
- metrics are buffered by rank 0 and committed to MLflow just before that checkpoint is
  reported; a resumed run skips the steps MLflow already holds, so every step is logged
  exactly once whatever the moment of the failure;
- on (re)start, each worker restores from `ray.train.get_checkpoint()` — after a worker or node
  failure (FailureConfig) and when the same job name is started again after a driver crash.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from ray.train.torch import TorchTrainer

from dupr.config import (
    ConfigError,
    DUPRConfig,
    check_bool,
    check_int,
    check_name,
    check_number,
    field_prefix,
    validate,
)
from dupr.data import ImageFolderDataset, bundled_image_folder, default_data_home
from dupr.data.folder import ImageDecodeError
from dupr.data.two_views import UndecodableDataError, build_loader, check_epoch_size
from dupr.model import DUPR
from dupr.train import BatchLoader, TrainState, build_state, compile_model, rng_state, train
from dupr.views import TwoViews
from dupr_platform import software, tracking
from dupr_platform.claims import KINDS, Claims, StartLine
from dupr_platform.cluster import (
    COMPUTE_PRIORITY,
    amounts,
    check_nodes,
    forwarded_env,
    largest_node,
    start_ray,
    wait_for_room,
)
from dupr_platform.environment import environment
from dupr_platform.failures import CheckpointLedger, StopOnUnrecoverable, UnrecoverableError
from dupr_platform.progress import Progress
from dupr_platform.ray_data import RayDataLoader, count_images, two_view_dataset
from dupr_platform.scratch import scratch_folder
from dupr_platform.shards import INDEX_NAME, ParquetImageDataset, ShardError, prepare_shards
from dupr_platform.smoke import (
    PeakMemory,
    StepTimer,
    flops_counted,
    profile_metrics,
    untimed_steps,
)
from dupr_platform.storage import (
    AWS_CREDENTIALS,
    Storage,
    StorageError,
    check_no_password,
    check_storage,
    open_storage,
    ray_storage_args,
)
from dupr_platform.text import one_line
from dupr_platform.tracking import (
    TRACKING_CREDENTIALS,
    RunLogger,
    absolute_tracking_uri,
    check_tracking,
    metric_rows,
    metrics_from_rows,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# The metrics of the steps up to a checkpoint that the tracking server had not taken when it
# was written (it could not be reached): a resume sends them.
UNSENT_FILE = "unsent_metrics.json"

# How often Ray Train's controller polls its workers (Ray's default: every 2 s). Starting a
# run and noticing its end each wait for polls: at 0.5 s a 3-step pre-training took about 4 s
# less (22 s against 27 s on 2 CPU cores), which every pre-training and test pays. A poll that
# a busy worker misses costs nothing: Ray marks a worker dead only after 10 minutes of missed
# polls (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S). Ray hands the driver's value to the
# controller; a value already in the environment wins.
TRAIN_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_INTERVAL_S = "0.5"
# `worker_group_start_minutes`, handed to the controller the same way; a value already in the
# environment wins here too (Ray's timeout message tells the user to set it).
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


# Field metadata: the field changes how a run executes (retries, logging, CPUs), not the
# weights it produces, so it is not part of a pipeline stage's cache key.
EXECUTION_ONLY = {"execution_only": True}


def execution_only_fields(cls: type) -> set[str]:
    """The names of `cls`'s fields marked `EXECUTION_ONLY`."""
    return {f.name for f in fields(cls) if f.metadata.get("execution_only")}


@dataclass
class PretrainSettings:
    """What a pre-training uses and how it runs: the method (a DUPRConfig), data, resources."""

    method: DUPRConfig = field(default_factory=DUPRConfig)
    # Parquet shards (s3://… or local prefix with _index.json, see dupr_platform.shards), a
    # local image folder, or None: the bundled photo set, as local Parquet shards.
    data: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata=EXECUTION_ONLY)
    gpus_per_worker: float = field(default=1.0, metadata=EXECUTION_ONLY)  # used when use_gpu
    # Data-loading processes per training worker ("torch" loader).
    loader_workers: int = field(default=0, metadata=EXECUTION_ONLY)
    # "torch": each worker decodes its share in DataLoader processes on its own node (exactly
    # reproducible). "ray": Ray Data tasks decode and augment anywhere in the cluster and
    # stream batches into the workers (needs Parquet shards; not bitwise reproducible).
    data_loader: str = "torch"
    ray_data_decoders: int = field(default=2, metadata=EXECUTION_ONLY)
    ray_data_cpus_per_decoder: float = field(default=1.0, metadata=EXECUTION_ONLY)
    # Worker-group restarts after worker or node loss.
    max_failures: int = field(default=3, metadata=EXECUTION_ONLY)
    # Ray's default is unlimited: a lost node would hang the run.
    controller_failure_limit: int = field(default=3, metadata=EXECUTION_ONLY)
    # How long Ray Train waits for the cluster to place the worker group (at the start, and
    # after a worker or node was lost) before that counts against controller_failure_limit.
    # Ray's default, 1 minute, is shorter than an autoscaler takes to replace a GPU node.
    worker_group_start_minutes: float = field(default=1.0, metadata=EXECUTION_ONLY)
    keep_checkpoints: int = field(default=2, metadata=EXECUTION_ONLY)
    log_every: int = field(default=10, metadata=EXECUTION_ONLY)
    # Report the step time, peak memory and (on a CPU) FLOPs per step as `profile/*` metrics
    # (the smoke run, dupr_platform.smoke); with log_every=1 every step is timed.
    profile: bool = field(default=False, metadata=EXECUTION_ONLY)

    def validate(self) -> PretrainSettings:
        """Every field's value; one ConfigError line naming the first bad one."""
        with field_prefix("method."):
            validate(self.method)
        for name in ("num_workers", "keep_checkpoints", "log_every", "ray_data_decoders"):
            check_int(name, getattr(self, name), low=1)
        for name in ("loader_workers", "max_failures", "controller_failure_limit"):
            check_int(name, getattr(self, name), low=0)
        check_number("cpus_per_worker", self.cpus_per_worker, above=0)
        check_number("worker_group_start_minutes", self.worker_group_start_minutes, above=0)
        check_number("ray_data_cpus_per_decoder", self.ray_data_cpus_per_decoder, above=0)
        check_bool("profile", self.profile)
        if self.use_gpu:
            check_number("gpus_per_worker", self.gpus_per_worker, above=0)
            if self.num_workers > 1 and self.gpus_per_worker < 1:
                raise ConfigError(
                    f"gpus_per_worker={self.gpus_per_worker}: at least 1 with num_workers="
                    f"{self.num_workers} (NCCL refuses two ranks on one GPU)"
                )
        batch = self.method.optim.batch_size
        if batch % self.num_workers:
            raise ConfigError(
                f"method.optim.batch_size={batch}: not divisible by num_workers="
                f"{self.num_workers} (Shuffle BN needs equal per-worker batches)"
            )
        if batch // self.num_workers < 2:
            raise ConfigError(
                f"method.optim.batch_size={batch}: {batch // self.num_workers} per worker with "
                f"num_workers={self.num_workers}; BatchNorm needs at least 2"
            )
        if self.method.optim.cuda_graph and self.num_workers > 1:
            raise ConfigError(
                f"method.optim.cuda_graph=True: one worker only (num_workers={self.num_workers}); "
                "the collectives of DDP and Shuffle BN are not captured"
            )
        if self.data_loader not in ("torch", "ray"):
            raise ConfigError(f"data_loader={self.data_loader!r}: valid: torch, ray")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise ConfigError(f"data={self.data!r}: a folder, a shard prefix or null")
        if self.data_loader == "ray" and self.data is not None and not is_shards(self.data):
            raise ConfigError(
                f"data={self.data!r}: data_loader=ray needs Parquet shards "
                "(python -m dupr_platform.shards SOURCE DEST)"
            )
        return self


@dataclass
class RunLocation:
    """Where runs are stored and tracked: one set of defaults for a pre-training and a study."""

    storage: str = "runs/storage"  # local folder or s3://bucket/prefix
    tracking_uri: str = "sqlite:///runs/mlflow.db"  # or http(s)://your-mlflow-server
    experiment: str = "dupr"


@dataclass
class PretrainJob(PretrainSettings, RunLocation):
    """One pre-training run: its settings plus where it is stored and tracked, by name."""

    name: str = "dupr-pretrain"  # fixed name: starting it again resumes it
    # The MLflow run this run is nested under (a pipeline's); a tag, never a param: it changes
    # when a crashed pipeline is started again and its pre-training continues.
    parent_run_id: str | None = field(default=None, metadata=EXECUTION_ONLY)

    def validate(self) -> PretrainJob:
        super().validate()
        check_name("name", self.name)
        for key in ("experiment", "storage", "tracking_uri"):
            check_name(key, getattr(self, key), slash_ok=True)
        check_uris(self.storage, self.tracking_uri, {"data": self.data})
        return self


def check_uris(storage: str, tracking_uri: str, data: dict[str, str | None]) -> None:
    """No password inside a location: credentials come from the environment."""
    keys = " and ".join(AWS_CREDENTIALS[:2])
    check_no_password("storage", storage, keys)
    check_no_password("tracking_uri", tracking_uri, " and ".join(TRACKING_CREDENTIALS[:2]))
    for name, uri in data.items():
        check_no_password(name, uri, keys)


@dataclass
class PretrainResult:
    run_id: str
    checkpoint_uri: str
    epochs: int
    steps: int
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Worker side


def is_shards(data: str | None) -> bool:
    """Parquet shards: an s3:// prefix, or a local folder holding the shard index."""
    return data is not None and (data.startswith("s3://") or (Path(data) / INDEX_NAME).exists())


def open_images(data: str) -> Any:
    """The training images: Parquet shards (the format for object storage) or an image folder."""
    return ParquetImageDataset(data) if is_shards(data) else ImageFolderDataset(data)


def default_data() -> str:
    """The bundled photo set in the object-storage format: Parquet shards in the data home.

    Built once (about a second) and reused; the local default thus reads the same format as a
    cluster run on s3:// shards.
    """
    dest = default_data_home() / "bundled-unlabeled-v1-512-shards"
    prepare_shards(str(bundled_image_folder()), str(dest), images_per_shard=128)
    return str(dest)


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's generators, in rank order (each rank draws its own patch-key samples)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def train_worker(config: dict[str, Any]) -> None:
    """Per-worker function of the TorchTrainer: the dupr/ loop plus checkpoint and log hooks."""
    # Where rank 0 writes each checkpoint before Ray uploads it (and then removes it); a worker
    # killed meanwhile leaves it to the next worker on the node (dupr_platform.scratch).
    with scratch_folder("checkpoints") as checkpoints:
        _train(config, checkpoints)


def _train(config: dict[str, Any], checkpoints: Path) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:  # Ray has placed every worker: the room they hold is no longer reserved
        StartLine.release_now(config.get("start_reservation"))
    cfg = DUPRConfig.from_dict(config["method"])
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    loader: BatchLoader
    if config["data_loader"] == "ray":
        loader = RayDataLoader.for_worker(
            "train",
            cfg.optim.batch_size // world,
            config["num_images"],
            pin_memory=device.type == "cuda",
        )
    else:
        loader = build_loader(
            open_images(config["data"]),
            TwoViews(cfg.model.image_size, cfg.augment),
            cfg.optim.batch_size // world,
            seed=cfg.seed,
            num_workers=config["loader_workers"],
            num_replicas=world,
            rank=rank,
            pin_memory=device.type == "cuda",
        )
    # A smoke run's numbers, from before the model is built: weights and banks count.
    memory = PeakMemory(device).start() if config.get("profile") and rank == 0 else None
    model = DUPR(cfg.model).to(device)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optim.compile:
        compile_model(model)  # before DDP wraps it
    if world > 1:
        # Memory banks are identical on every rank by construction (all-gathered keys), and
        # BN running statistics are not used in training: no per-step buffer broadcast.
        model = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"forward_sync_buffers": False}
        )
    # The common seed above gave every rank the same weights and banks; from here each rank
    # draws its own patch-key cells (DUPR's sampled keys), or every rank would take the same
    # cells of its own images. Rank 0 keeps the run's seed: a one-worker run is unchanged.
    torch.manual_seed(cfg.seed + rank * 2**32)
    state = build_state(model, cfg.optim, len(loader), device)

    checkpoint = ray.train.get_checkpoint()
    unsent = []  # the metrics a checkpoint carries (their tracking server was unreachable)
    if checkpoint:
        with unrecoverable_if_storage_is_down(config["storage"]), checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
            if (Path(d) / UNSENT_FILE).exists():
                unsent = metrics_from_rows(json.loads((Path(d) / UNSENT_FILE).read_text()))
        rngs = saved.pop("rng_per_rank")
        saved["rng"] = rngs[rank] if len(rngs) == world else rngs[0]
        state.load_state_dict(saved)
        log.info("rank %d resumed at epoch %d, step %d", rank, state.epoch, state.step)

    logger = None
    if rank == 0:
        # Continues the driver's run; steps MLflow already holds (from before a failure) are
        # dropped by the logger, so every step appears once.
        logger = RunLogger.start(
            config["tracking_uri"], config["experiment"], config["name"], run_id=config["run_id"]
        )
        if checkpoint:  # visible in the UI: this run continued from a checkpoint at that step
            logger.set_tag("dupr.resumed_at_step", str(state.step))
            logger.resend(unsent)
        # What the throughput numbers were measured on (a resumed run records its last start).
        logger.set_tag("dupr.world_size", str(world))
        logger.set_tag(
            "dupr.device",
            torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        )
        logger.set_tag("dupr.worker_niceness", str(os.nice(0)))  # 0: see COMPUTE_PRIORITY
        # The releases the weights were computed with (rank 0's node; a resumed run, its last).
        logger.set_tag(software.TAG, software.summary())
        logger.log_text(software.installed(), software.ARTIFACT)

    total_steps = cfg.optim.epochs * len(loader)
    progress = Progress(f"pretrain {config['name']}", total_steps, unit="step", done=state.step)

    last_loss = [float("nan")]
    timer = StepTimer(untimed_steps(cfg.optim.cuda_graph, device.type == "cuda"))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        timer.tick()
        last_loss[0] = float(metrics.get("loss", float("nan")))
        if logger:
            logger.log_metrics(step, metrics)
            shown: dict[str, float] = {
                k: metrics[k] for k in ("loss", "images_per_s") if k in metrics
            }
            progress.update(step, {"epoch": (step - 1) // len(loader) + 1, **shown})

    def on_epoch_end(s: TrainState) -> None:
        rngs = _gather_rng_states()
        # The epoch's last logged loss rides along: Tune's schedulers read it (sweeps).
        summary = {"epoch": s.epoch, "step": s.step, "loss": last_loss[0]}
        if logger is None:  # not rank 0
            ray.train.report(summary, checkpoint=None)
            return
        logger.commit()  # sent in the background while the state is serialised
        d = checkpoints / f"checkpoint_epoch={s.epoch:04d}"
        d.mkdir()
        payload = s.state_dict()
        del payload["rng"]
        payload["rng_per_rank"] = rngs
        torch.save(payload, d / STATE_FILE)
        (d / "meta.json").write_text(json.dumps(summary))
        # Metrics reach MLflow before the checkpoint counts: a crash in between resumes from
        # the previous checkpoint and the logger skips the steps MLflow already has. While
        # the tracking server cannot be reached, training goes on: the checkpoint carries
        # what it has not taken, and the logger keeps trying.
        if logger.sent(tracking.SEND_WAIT_S):
            logger.flush()  # raises if the server refused a batch
        else:
            (d / UNSENT_FILE).write_text(json.dumps(metric_rows(logger.unsent())))
        # The last is waited for, so that fit() returns with it counted.
        report_checkpoint(summary, d, config["storage"], wait=s.epoch == cfg.optim.epochs)

    steps_before = state.step
    try:
        with flops_counted(device if memory else None) as flops:
            train(
                state,
                loader,
                cfg.optim,
                device,
                global_batch=cfg.optim.batch_size,
                log_every=config["log_every"],
                on_log=on_log,
                on_epoch_end=on_epoch_end,
            )
        if memory is not None and logger is not None:
            measured = profile_metrics(
                device,
                cfg.optim.batch_size // world,
                memory.stop(),
                timer.step_s(),
                flops.get("total"),
                state.step - steps_before,
            )
            logger.log_metrics(state.step, measured)
            logger.commit()
    except (UndecodableDataError, ShardError) as exc:
        # The data itself is broken (or gone): every restart would fail the same way.
        raise UnrecoverableError(f"data {config['data']}: {_first_line(exc)}") from None
    # The driver ends the run once the workers return: every step must be in MLflow by then.
    # (After a failure nothing needs sending: what the last checkpoint counts was sent or is
    # carried by it, and the later steps are trained again.)
    if logger:
        logger.flush()  # waits for a tracking server that cannot be reached (tracking.PATIENCE_S)


def _first_line(exc: BaseException) -> str:
    """The exception's own message: a DataLoader worker's error carries its traceback after it."""
    return one_line(exc, keep_line=_own_message, limit=500)


def _own_message(line: str) -> bool:
    return not line.startswith(("Caught ", "Original Traceback", "File "))


def report_checkpoint(metrics: dict[str, Any], folder: Path, storage: str, wait: bool) -> None:
    """Report the checkpoint written in `folder` to Ray Train, which uploads it to `storage`
    (in the background unless `wait`), counts it once uploaded (in report order), then
    removes `folder`. The upload runs beside the next epoch: a paper-scale state is 625 MB,
    seconds for which every GPU would wait at its next all-reduce
    (benchmarks/checkpoint_stall.py)."""
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=folder.name,
        checkpoint_upload_mode=CheckpointUploadMode.SYNC if wait else CheckpointUploadMode.ASYNC,
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=functools.partial(upload_checkpoint, storage),
    )


def upload_checkpoint(
    storage: str, checkpoint: ray.train.Checkpoint, name: str
) -> ray.train.Checkpoint:
    """Ray's own upload (pyarrow), with a store that is down made an `UnrecoverableError`: also
    in Ray's background upload thread, whose errors end the worker like its own. (`get_storage`
    is a Ray DeveloperAPI; tests/test_storage_outage.py follows it across upgrades.)"""
    with unrecoverable_if_storage_is_down(storage):
        return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)


@contextlib.contextmanager
def unrecoverable_if_storage_is_down(uri: str) -> Iterator[None]:
    """Turn a storage error into `UnrecoverableError` when the store does not answer at all.

    pyarrow and Ray have already retried the request; a quick write/read probe then tells a
    store that is down (or a bucket that is gone) from a hiccup, which is left to Ray's
    worker-group restarts.
    """
    try:
        yield
    except OSError:
        try:
            check_storage(open_storage(uri))
        except StorageError as down:
            raise UnrecoverableError(str(down)) from None
        raise


# --------------------------------------------------------------------------------------------
# Driver side


def preflight_config(job: PretrainJob) -> None:
    """The checks that need no cluster: configuration, data, storage, tracking."""
    job.validate()
    check_data(job)
    check_storage(open_storage(job.storage))
    check_tracking(job.tracking_uri)
    warn_if_gpus_will_wait(job)
    warn_if_compile_has_no_compiler(job)


def warn_if_gpus_will_wait(job: PretrainSettings) -> None:
    """One warning line for a GPU job whose torch loader cannot keep its GPUs fed: the
    training process decoding alone, or the colour steps in PIL (about 4.4× the loader's work
    per sample, `benchmarks/decode_throughput.py`). Not an error: a small model or a slow GPU
    may still keep up, and the CPU and GPU paths' pixels differ by rounding."""
    if not job.use_gpu or job.data_loader != "torch":
        return
    if job.loader_workers == 0:
        log.warning(
            "use_gpu with loader_workers=0: each training process decodes and augments its own "
            "batches, so the GPUs wait for data; give it loader processes (loader_workers)"
        )
    elif job.method.augment.photometric_on == "loader":
        log.warning(
            "use_gpu with method.augment.photometric_on=loader: the %d loader processes per "
            "GPU run the colour steps in PIL, about 4.4x the work per sample of "
            "method.augment.photometric_on=device, which runs them on the GPU",
            job.loader_workers,
        )


def warn_if_compile_has_no_compiler(job: PretrainSettings) -> None:
    """One warning line for ``method.optim.compile`` where torch.compile finds no C++ compiler
    (inductor builds its CPU kernels with one, Triton its GPU launchers with a C compiler):
    workers on a machine like this one would stop at their first step with the compiler's
    traceback. Not an error: on a cluster the workers run on other nodes, which may have one."""
    if not job.method.optim.compile:
        return
    # Inductor's own search (its config names the compilers), imported only when asked: ~1 s.
    from torch._inductor import config as inductor
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # torch's InvalidCxxCompiler, whose module has moved between versions
        searched = ", ".join(c for c in inductor.cpp.cxx if c) or "none"
        log.warning(
            "method.optim.compile=True: torch.compile finds no C++ compiler on this machine "
            "(searched: %s); workers without one stop at their first step: install g++ "
            "(make system-deps) or leave method.optim.compile off",
            searched,
        )


DATA_SAMPLE = 16  # images decoded in preflight


def check_data(job: PretrainSettings) -> None:
    """Data that is certain to fail, found before any worker starts: a missing folder or
    shard index, fewer images than one batch per worker, or a sample in which no image decodes.

    The sample is spread over a folder's files, or the first images of a shard set (one row
    group, not a download of the set). Single bad files are fine: training skips them.
    """
    if job.data is None:  # the bundled set, which absolute_locations prepares
        return
    images = open_images(job.data)  # exists and holds images (or a complete shard index)
    n, batch = len(images), job.method.optim.batch_size
    try:
        check_epoch_size(n, batch // job.num_workers, job.num_workers)
    except ConfigError:
        raise ConfigError(
            f"data={job.data!r}: {n} images, less than one batch per worker "
            f"(method.optim.batch_size={batch} over num_workers={job.num_workers})"
        ) from None
    step = max(1, n // DATA_SAMPLE) if isinstance(images, ImageFolderDataset) else 1
    sample = list(range(0, n, step))[:DATA_SAMPLE]
    errors: list[ImageDecodeError] = []
    for i in sample:
        try:
            images.load(i)
        except ImageDecodeError as exc:
            errors.append(exc)
    if len(errors) == len(sample):
        raise ConfigError(
            f"data={job.data!r}: none of the {len(sample)} images sampled decodes "
            f"(first: {errors[0]})"
        )
    if errors:
        log.warning(
            "data %s: %d of %d sampled images do not decode (skipped in training), e.g. %s",
            job.data,
            len(errors),
            len(sample),
            errors[0],
        )


def preflight(job: PretrainJob) -> None:
    """Everything checkable before a worker starts; each failure is one clear line."""
    preflight_config(job)
    preflight_cluster(job)


def pretraining_bundles(job: PretrainJob) -> list[dict[str, float]]:
    """What the job's workers (Ray Train's placement group) and Ray Data decoders each take
    from the cluster, one task or worker a bundle."""
    worker = {"CPU": job.cpus_per_worker} | ({"GPU": job.gpus_per_worker} if job.use_gpu else {})
    bundles = [worker] * job.num_workers
    if job.data_loader == "ray":
        # Decoding tasks, plus one whole CPU that Ray Data's Parquet listing task takes.
        bundles += [{"CPU": job.ray_data_cpus_per_decoder}] * job.ray_data_decoders
        bundles += [{"CPU": 1.0}]
    return bundles


def pretraining_needs(job: PretrainJob) -> dict[str, float]:
    """The CPUs and GPUs the job's workers (and Ray Data decoders) take from the cluster."""
    bundles = pretraining_bundles(job)
    return {k: float(sum(b.get(k, 0.0) for b in bundles)) for k in KINDS}


def preflight_cluster(job: PretrainJob) -> None:
    """The connected Ray cluster can ever provide what the job asks for (else it would hang)."""
    total = ray.cluster_resources()
    need = pretraining_needs(job)
    need_cpu, need_gpu = need["CPU"], need["GPU"]
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"num_workers={job.num_workers} × cpus_per_worker={job.cpus_per_worker}"
            f"{' + Ray Data decoders' if job.data_loader == 'ray' else ''}: "
            f"needs {need_cpu:g} CPUs, the Ray cluster has {total.get('CPU', 0):g}"
        )
    if total.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"num_workers={job.num_workers} × gpus_per_worker={job.gpus_per_worker}: "
            f"needs {need_gpu:g} GPUs, the Ray cluster has {total.get('GPU', 0):g}"
        )
    # Each training worker (and each Ray Data decoder) runs on one node.
    largest = largest_node()
    per_task = {"cpus_per_worker": ("CPU", job.cpus_per_worker)}
    if job.use_gpu:
        per_task["gpus_per_worker"] = ("GPU", job.gpus_per_worker)
    if job.data_loader == "ray":
        per_task["ray_data_cpus_per_decoder"] = ("CPU", job.ray_data_cpus_per_decoder)
    for name, (resource, amount) in per_task.items():
        if amount > largest.get(resource, 0):
            raise ConfigError(
                f"{name}={amount:g}: needs {amount:g} {resource}s on one node, the Ray "
                f"cluster's largest node has {largest.get(resource, 0):g}"
            )


def absolute_locations(job: PretrainJob) -> PretrainJob:
    """Relative local paths resolved against the driver's directory.

    Ray workers run in their own working directories, so a relative `runs/mlflow.db` or data
    folder would mean something else there. (Local paths suit one machine; a multi-node cluster
    needs s3:// storage and data, and an http:// tracking server.)
    """
    if job.data is None:
        job.data = default_data()
    elif "://" not in job.data:
        job.data = str(Path(job.data).resolve())
    if "://" not in job.storage:
        job.storage = str(Path(job.storage).resolve())
    job.tracking_uri = absolute_tracking_uri(job.tracking_uri)
    return job


def run_pretraining(
    job: PretrainJob,
    callbacks: list[Any] | None = None,
    tags: dict[str, str] | None = None,
    waits_for_room: bool = True,
    reservation: str | None = None,
) -> PretrainResult:
    """Pre-train on the connected Ray cluster (or a local one), resuming `job.name` if it exists.

    `callbacks` go to the trainer's RunConfig, e.g. Ray Tune's TuneReportCallback when the
    pre-training runs inside a Tune trial (each epoch's report then reaches Tune's scheduler).
    `tags` are set on the MLflow run (a pipeline's stage tags). It starts once the cluster has
    room for its workers (`wait_for_room`); a pipeline waits in its own line instead
    (`waits_for_room=False`) and hands over the room it `reservation` holds, which the first
    worker gives back once Ray has placed them all, or this call when it ends.
    """
    job = absolute_locations(job)
    assert job.data is not None  # absolute_locations set it
    try:
        preflight_config(job)
        if start_ray(f"pretrain {job.name}"):
            check_nodes(job.storage, job.tracking_uri)
        preflight_cluster(job)
        if waits_for_room:
            need = pretraining_needs(job)
            alone = Claims()  # no other pre-training shares this driver's line
            alone.want(job.name, pretraining_bundles(job))
            reservation = wait_for_room(
                alone,
                job.name,
                need,
                lambda room: print(
                    f"pre-training {job.name}: waits to start until the cluster has room for "
                    f"its {amounts(need)} ({amounts(room)} free now)",
                    flush=True,
                ),
                start_lapse_s(job),
            )
        return _pretrain(job, callbacks, tags, reservation)
    finally:
        if ray.is_initialized():
            StartLine.release_now(reservation)


def start_lapse_s(job: PretrainJob) -> float:
    """How long the room a pre-training was let start into stays reserved at most
    (`StartLine`): Ray Train's start limit, and two minutes for what comes before it (the
    MLflow run, the controller)."""
    return 60.0 * job.worker_group_start_minutes + 120.0


def _pretrain(
    job: PretrainJob,
    callbacks: list[Any] | None,
    tags: dict[str, str] | None,
    reservation: str | None,
) -> PretrainResult:
    assert job.data is not None  # absolute_locations set it
    storage = open_storage(job.storage)

    resumes_from = latest_checkpoint(storage, job.name)
    # The MLflow run of the checkpoints in this storage: another storage's pre-training of the
    # same name (a colleague's on a shared tracking server, the same preset) has its own run.
    # Without a checkpoint the pre-training starts over (its folder deleted), so a run of that
    # key that holds metrics is an earlier attempt's: continuing it would drop the new steps.
    logger = RunLogger.start(
        job.tracking_uri,
        job.experiment,
        f"{job.name} in {storage.uri}",
        tags={"mlflow.runName": job.name, **(tags or {})},
        parent_run_id=job.parent_run_id,
        starts_over=resumes_from is None,
    )
    # Params (immutable in MLflow) are what defines the weights; how the run executes may change
    # when it is continued after a crash (more loader processes, another parent pipeline run),
    # so those fields are tags.
    job_fields = {k: v for k, v in asdict(job).items() if k not in ("method", "parent_run_id")}
    neutral = execution_only_fields(PretrainJob)
    logger.log_params(
        {"job": {k: v for k, v in job_fields.items() if k not in neutral}, **job.method.to_dict()}
    )
    logger.set_tags({f"job.{k}": v for k, v in job_fields.items() if k in neutral})
    logger.log_dict({"job": job_fields, **job.method.to_dict()}, "config/resolved.json")
    logger.flush()

    datasets, num_images = None, None
    if job.data_loader == "ray":
        datasets = {
            "train": two_view_dataset(
                job.data,
                job.method.model.image_size,
                job.method.to_dict()["augment"],
                job.method.seed,
                concurrency=job.ray_data_decoders,
                num_cpus=job.ray_data_cpus_per_decoder,
            )
        }
        num_images = count_images(job.data)

    ledger = CheckpointLedger.remote(resumes_from)  # type: ignore[attr-defined]  # @ray.remote
    trainer = _Trainer(
        train_worker,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all") if datasets else None,
        train_loop_config={
            "method": job.method.to_dict(),
            "data": job.data,
            "loader_workers": job.loader_workers,
            "tracking_uri": job.tracking_uri,
            "experiment": job.experiment,
            "name": job.name,
            "run_id": logger.run_id,
            "storage": job.storage,
            "log_every": job.log_every,
            "data_loader": job.data_loader,
            "num_images": num_images,
            "profile": job.profile,
            "start_reservation": reservation,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker}
            | ({"GPU": job.gpus_per_worker} if job.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            failure_config=ray.train.FailureConfig(
                max_failures=job.max_failures, controller_failure_limit=job.controller_failure_limit
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
            worker_runtime_env={"env_vars": forwarded_env() | COMPUTE_PRIORITY},
            callbacks=[
                StopOnUnrecoverable(
                    resumes_from, "" if storage.is_local else "s3://", ledger=ledger
                ),
                *(callbacks or []),
            ],
            **ray_storage_args(storage),
        ),
    )
    try:
        # Ray Train's controller reads both from the driver's environment.
        with environment(
            {
                TRAIN_POLL_INTERVAL: os.environ.get(TRAIN_POLL_INTERVAL, TRAIN_POLL_INTERVAL_S),
                WORKER_GROUP_START_TIMEOUT: os.environ.get(
                    WORKER_GROUP_START_TIMEOUT, f"{60.0 * job.worker_group_start_minutes:g}"
                ),
            }
        ):
            result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException as exc:
        interrupted = not isinstance(exc, Exception)  # Ctrl-C, SIGTERM (ray job stop)
        message = (
            "interrupted"
            if interrupted
            else failure_message(exc, storage, job.name, _ledger_latest(ledger))
        )
        logger.abandon("KILLED" if interrupted else "FAILED", message)
        if interrupted:
            raise
        raise UnrecoverableError(message) from None
    ckpt_uri = storage.uri_for(job.name, Path(result.checkpoint.path).name)
    logger.set_tag("dupr.final_checkpoint", ckpt_uri)
    logger.log_text(ckpt_uri + "\n", "final_checkpoint.txt")
    logger.end("FINISHED")
    metrics = dict(result.metrics or {})
    return PretrainResult(
        logger.run_id, ckpt_uri, int(metrics.get("epoch", 0)), int(metrics.get("step", 0)), metrics
    )


class _Trainer(TorchTrainer):
    """`TorchTrainer` that leaves Ctrl-C to Python: a KeyboardInterrupt in the driver.

    Ray Train 2.60's `fit()` replaces the driver's SIGINT handler with one that asks its
    controller to abort, and never puts the old one back. Measured with the pipeline: Ctrl-C
    during pre-training ended the driver with exit status 1 and no line; Ctrl-C after it was
    swallowed, the pipeline ran to its end. There is no public switch, hence the override of
    its private method; `tests/test_crash_resume.py` sends Ctrl-C during pre-training and sees
    KeyboardInterrupt's line and exit status 130.
    """

    def _register_sigint_handler(self, controller: Any) -> None:
        pass


def latest_checkpoint(storage: Storage, name: str) -> str | None:
    """The URI of run `name`'s latest complete checkpoint, as Ray Train records it; None when
    it has none yet or the storage cannot be read."""
    try:
        result = ray.train.Result.from_path(
            storage.join(name), storage_filesystem=storage.filesystem
        )
    except Exception:  # no snapshot yet, or storage down: nothing to name
        return None
    return (
        None
        if result.checkpoint is None
        else storage.uri_for(name, Path(result.checkpoint.path).name)
    )


def _ledger_latest(ledger: Any) -> str | None:
    """The ledger's checkpoint; None when it cannot answer (its node is gone)."""
    try:
        return ray.get(ledger.latest.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return None


def failure_message(
    exc: BaseException, storage: Storage, name: str, last: str | None = None
) -> str:
    """One line for a pre-training that ended with `exc`: the cause and the last checkpoint.

    `last` is the latest complete checkpoint as the run's `CheckpointLedger` saw it; when it
    has none, Ray's own record in `storage` is read (it may be down: that is often the cause).

    Ray Train reports an unrecoverable worker error (see `dupr_platform.failures`) and a failed
    write of its own state as controller errors, worker errors that exhausted `max_failures`
    as a worker-group error, and a controller that could not start (storage unreachable at
    start) as a dead actor.
    """
    cause = exc
    if isinstance(exc, ray.train.ControllerError):
        cause = exc.controller_failure
        if isinstance(cause, UnrecoverableError):
            return str(cause)
    elif isinstance(exc, ray.train.WorkerGroupError):
        rank, first = min(exc.worker_failures.items(), key=lambda kv: kv[0])
        cause = first
    if isinstance(cause, OSError):
        try:
            check_storage(storage)
        except StorageError as down:
            cause = down
    text = _first_line(cause) if not isinstance(cause, StorageError) else str(cause)
    if isinstance(exc, ray.exceptions.ActorDiedError):
        text = "the run could not start: " + _first_line(exc)
    last = last or latest_checkpoint(storage, name)
    return (
        f"{text}; last complete checkpoint: {last or 'none'}; once the cause is fixed, the "
        "same command resumes from it"
    )


def load_checkpoint_state(checkpoint_uri: str) -> dict[str, Any]:
    """The training state saved by `train_worker`, from a local or s3:// checkpoint URI."""
    data = open_storage(checkpoint_uri).read_bytes(STATE_FILE)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
