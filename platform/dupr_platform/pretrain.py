"""DUPR pre-training on Ray Train (V2): DDP workers, checkpoints in object storage, MLflow.

The driver (`run_pretraining`) checks everything that can be checked before any worker starts
(`preflight`), opens or continues the MLflow run, and fits a `TorchTrainer` whose per-worker
function (`train_worker`) is the plain `dupr.train` loop with three hooks:

- after every epoch, rank 0 writes the complete training state (model with memory banks,
  optimizer, schedule, scaler, epoch/step, every rank's random generators) into a checkpoint
  directory and `ray.train.report`s it; Ray uploads it to the run's storage and only then
  counts it, so a crash mid-write never produces a broken "latest";
- metrics are buffered by rank 0 and committed to MLflow just before that checkpoint is
  reported; a resumed run skips the steps MLflow already holds, so every step is logged
  exactly once whatever the moment of the failure;
- on (re)start, each worker restores from `ray.train.get_checkpoint()` — after a worker or node
  failure (FailureConfig) and when the same job name is started again after a driver crash.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from dupr.config import ConfigError, DUPRConfig, validate
from dupr.data import ImageFolderDataset, default_data_home, embedded_image_folder
from dupr.data.two_views import build_loader
from dupr.model import DUPR
from dupr.train import TrainState, build_state, rng_state, train
from dupr.views import TwoViews
from dupr_platform.progress import Progress
from dupr_platform.ray_data import RayDataLoader, count_images, two_view_dataset
from dupr_platform.shards import INDEX_NAME, ParquetImageDataset, ShardError, prepare_shards
from dupr_platform.storage import (
    StorageError,
    aws_env,
    check_storage,
    open_storage,
    ray_storage_args,
)
from dupr_platform.tracking import RunLogger, TrackingError, check_tracking

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"

# Ray starts its worker processes at niceness 15 (RAY_worker_niceness), so that its own control
# processes stay responsive. A training worker at 15 yields the CPU to every normal-priority
# process on the node, Ray's driver and agents included: on a 2-core machine that made each step
# 15-25 % slower than the same loop in a plain process (benchmarks/ray_overhead.py). Processes
# that do the experiment's compute (training workers, pipeline stage tasks) run at normal priority,
# as Ray itself does for job drivers; Ray Data's decoding actors stay at 15 and yield to them.
COMPUTE_PRIORITY = {"RAY_worker_niceness": "0"}


@dataclass
class PretrainJob:
    """Where and how a pre-training runs; the method itself is `method` (a DUPRConfig)."""

    name: str = "dupr-pretrain"  # fixed name: starting it again resumes it
    method: DUPRConfig = field(default_factory=DUPRConfig)
    # Parquet shards (s3://… or local prefix with _index.json, see dupr_platform.shards), a
    # local image folder, or None: the embedded photo set, as local Parquet shards.
    data: str | None = None
    storage: str = "runs/storage"  # local folder or s3://bucket/prefix
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "dupr"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    loader_workers: int = 0  # data-loading processes per training worker ("torch" loader)
    # "torch": each worker decodes its share in DataLoader processes on its own node (exactly
    # reproducible). "ray": Ray Data actors decode and augment anywhere in the cluster and
    # stream batches into the workers (needs Parquet shards; not bitwise reproducible).
    data_loader: str = "torch"
    ray_data_actors: int = 2
    ray_data_cpus_per_actor: float = 1.0
    max_failures: int = 3  # worker-group restarts after worker or node loss
    controller_failure_limit: int = 3  # Ray's default is unlimited: a lost node would hang the run
    keep_checkpoints: int = 2
    log_every: int = 10
    parent_run_id: str | None = None

    def validate(self) -> PretrainJob:
        validate(self.method)
        for name in ("num_workers", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker!r}: must be > 0")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"gpus_per_worker={self.gpus_per_worker!r}: must be > 0")
        if self.max_failures < 0 or self.controller_failure_limit < 0:
            raise ConfigError("max_failures/controller_failure_limit: must be >= 0")
        batch = self.method.optim.batch_size
        if batch % self.num_workers:
            raise ConfigError(
                f"optim.batch_size={batch}: not divisible by num_workers={self.num_workers} "
                "(Shuffle BN needs equal per-worker batches)"
            )
        if self.data_loader not in ("torch", "ray"):
            raise ConfigError(f"data_loader={self.data_loader!r}: valid: torch, ray")
        if self.data_loader == "ray" and self.data is not None and not is_shards(self.data):
            raise ConfigError(
                f"data={self.data!r}: data_loader=ray needs Parquet shards "
                "(python -m dupr_platform.shards SOURCE DEST)"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: must be a non-empty name without '/'")
        return self


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
    """The embedded photo set in the object-storage format: Parquet shards in the data home.

    Built once (about a second) and reused; the local default thus reads the same format as a
    cluster run on s3:// shards.
    """
    dest = default_data_home() / "embedded-unlabeled-v1-512-shards"
    prepare_shards(str(embedded_image_folder()), str(dest), images_per_shard=128)
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
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = DUPRConfig.from_dict(config["method"])
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    if config["data_loader"] == "ray":
        loader = RayDataLoader.for_worker(
            "train", cfg.optim.batch_size // world, config["num_images"], device=device
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
    model = DUPR(cfg.model).to(device)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        # Memory banks are identical on every rank by construction (all-gathered keys), and
        # BN running statistics are not used in training: no per-step buffer broadcast.
        model = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"forward_sync_buffers": False}
        )
    state = build_state(model, cfg.optim, len(loader), device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
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
        # What the throughput numbers were measured on (a resumed run records its last start).
        logger.set_tag("dupr.world_size", str(world))
        logger.set_tag(
            "dupr.device",
            torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        )
        logger.set_tag("dupr.worker_niceness", str(os.nice(0)))  # 0: see COMPUTE_PRIORITY

    total_steps = cfg.optim.epochs * len(loader)
    progress = Progress(f"pretrain {config['name']}", total_steps, unit="step")

    last_loss = [float("nan")]

    def on_log(step: int, metrics: dict[str, float]) -> None:
        last_loss[0] = float(metrics.get("loss", float("nan")))
        if logger:
            logger.log_metrics(step, metrics)
            shown = {k: metrics[k] for k in ("loss", "images_per_s") if k in metrics}
            progress.update(step, {"epoch": (step - 1) // len(loader) + 1, **shown})

    def on_epoch_end(s: TrainState) -> None:
        rngs = _gather_rng_states()
        # The epoch's last logged loss rides along: Tune's schedulers read it (sweeps).
        summary = {"epoch": s.epoch, "step": s.step, "loss": last_loss[0]}
        if rank != 0:
            ray.train.report(summary, checkpoint=None)
            return
        logger.commit()  # sent in the background while the state is serialised
        with tempfile.TemporaryDirectory() as d:
            payload = s.state_dict()
            del payload["rng"]
            payload["rng_per_rank"] = rngs
            torch.save(payload, Path(d) / STATE_FILE)
            (Path(d) / "meta.json").write_text(json.dumps(summary))
            # Metrics reach MLflow before the checkpoint counts: a crash in between resumes from
            # the previous checkpoint and the logger skips the steps MLflow already has.
            logger.flush()
            ray.train.report(
                summary,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"checkpoint_epoch={s.epoch:04d}",
            )

    try:
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
    finally:
        if logger:
            logger.flush()


# --------------------------------------------------------------------------------------------
# Driver side


def preflight_config(job: PretrainJob) -> None:
    """The checks that need no cluster: configuration, data, storage, tracking."""
    job.validate()
    if job.data is not None:
        open_images(job.data)  # exists and holds images (or a complete shard index)
    check_storage(open_storage(job.storage))
    check_tracking(job.tracking_uri)


def preflight(job: PretrainJob) -> None:
    """Everything checkable before a worker starts; each failure is one clear line."""
    preflight_config(job)
    preflight_cluster(job)


def preflight_cluster(job: PretrainJob) -> None:
    """The connected Ray cluster can ever provide what the job asks for (else it would hang)."""
    total = ray.cluster_resources()
    need_cpu = job.num_workers * job.cpus_per_worker
    if job.data_loader == "ray":
        # Decoding actors, plus one whole CPU that Ray Data's Parquet listing task takes.
        need_cpu += job.ray_data_actors * job.ray_data_cpus_per_actor + 1
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"num_workers={job.num_workers} × cpus_per_worker={job.cpus_per_worker}"
            f"{' + Ray Data actors' if job.data_loader == 'ray' else ''}: "
            f"needs {need_cpu:g} CPUs, the Ray cluster has {total.get('CPU', 0):g}"
        )
    need_gpu = job.num_workers * job.gpus_per_worker if job.use_gpu else 0
    if total.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"num_workers={job.num_workers} × gpus_per_worker={job.gpus_per_worker}: "
            f"needs {need_gpu:g} GPUs, the Ray cluster has {total.get('GPU', 0):g}"
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
    prefix = "sqlite:///"
    if job.tracking_uri.startswith(prefix) and not job.tracking_uri.startswith(prefix + "/"):
        job.tracking_uri = prefix + str(Path(job.tracking_uri[len(prefix) :]).resolve())
    return job


def ensure_ray(runtime_env: dict[str, Any]) -> None:
    """Connect to the cluster in RAY_ADDRESS (e.g. inside `ray job submit`), else start a local
    instance whose workers get `runtime_env`.

    Inside a submitted job the job's runtime environment is already the default for every task;
    Ray refuses a second one with overlapping keys, so none is passed there (the launcher and
    the pipeline hand the variables to their own workers and tasks explicitly anyway).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(runtime_env=runtime_env)


def run_pretraining(job: PretrainJob, callbacks: list[Any] | None = None) -> PretrainResult:
    """Pre-train on the connected Ray cluster (or a local one), resuming `job.name` if it exists.

    `callbacks` go to the trainer's RunConfig, e.g. Ray Tune's TuneReportCallback when the
    pre-training runs inside a Tune trial (each epoch's report then reaches Tune's scheduler).
    """
    job = absolute_locations(job)
    preflight_config(job)
    ensure_ray({"env_vars": aws_env()})
    preflight_cluster(job)
    storage = open_storage(job.storage)

    logger = RunLogger.start(
        job.tracking_uri, job.experiment, job.name, parent_run_id=job.parent_run_id
    )
    resolved = {
        "job": {k: v for k, v in asdict(job).items() if k != "method"},
        **job.method.to_dict(),
    }
    logger.log_params(resolved)
    logger.log_dict(resolved, "config/resolved.json")
    logger.flush()

    datasets, num_images = None, None
    if job.data_loader == "ray":
        datasets = {
            "train": two_view_dataset(
                job.data,
                job.method.model.image_size,
                job.method.to_dict()["augment"],
                job.method.seed,
                concurrency=job.ray_data_actors,
                num_cpus=job.ray_data_cpus_per_actor,
            )
        }
        num_images = count_images(job.data)

    trainer = TorchTrainer(
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
            "log_every": job.log_every,
            "data_loader": job.data_loader,
            "num_images": num_images,
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
            worker_runtime_env={"env_vars": aws_env() | COMPUTE_PRIORITY},
            callbacks=callbacks,
            **ray_storage_args(storage),
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        logger.end("FAILED")
        raise
    if result.error:
        logger.end("FAILED")
        raise result.error
    ckpt_uri = storage.uri_for(job.name, Path(result.checkpoint.path).name)
    logger.set_tag("dupr.final_checkpoint", ckpt_uri)
    logger.log_text(ckpt_uri + "\n", "final_checkpoint.txt")
    logger.end("FINISHED")
    metrics = dict(result.metrics or {})
    return PretrainResult(
        logger.run_id, ckpt_uri, int(metrics.get("epoch", 0)), int(metrics.get("step", 0)), metrics
    )


def load_checkpoint_state(checkpoint_uri: str) -> dict[str, Any]:
    """The training state saved by `train_worker`, from a local or s3:// checkpoint URI."""
    data = open_storage(checkpoint_uri).read_bytes(STATE_FILE)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# Command line: `python -m dupr_platform.pretrain [preset=cpu_demo] key=value ...`


def job_from_overrides(overrides: list[str]) -> PretrainJob:
    """A job from Hydra-style `key=value` overrides over a method preset.

    `preset=NAME` picks the method preset (default `cpu_demo`); `method.model.tau=0.15`,
    `num_workers=2`, `storage=s3://bucket/prefix` etc. set fields. Unknown keys are errors.
    """
    from omegaconf import OmegaConf  # Hydra's config library; only the driver needs it

    from dupr.config import preset

    pairs = dict(o.split("=", 1) if "=" in o else (o, None) for o in overrides)
    bad = [k for k, v in pairs.items() if v is None]
    if bad:
        raise ConfigError(f"{bad[0]}: overrides are written key=value")
    base = asdict(PretrainJob(method=preset(pairs.pop("preset", "cpu_demo"))))
    cfg = OmegaConf.create(base)
    for key, value in pairs.items():
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{key}: unknown configuration key")
        OmegaConf.update(cfg, key, _parse(value))
    values = OmegaConf.to_container(cfg, resolve=True)
    method = DUPRConfig.from_dict(values.pop("method"))
    return PretrainJob(method=method, **values).validate()


def _parse(value: str) -> Any:
    """YAML scalar/list parsing, as Hydra does for override values."""
    import yaml

    return yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Without Ray's dashboard (ray[default]) the state-actor reconciliation only logs failures.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    try:
        job = job_from_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = run_pretraining(job)
    except (
        ConfigError,
        StorageError,
        TrackingError,
        ShardError,
        FileNotFoundError,
        NotADirectoryError,
    ) as err:  # bad input, found before any worker started
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pre-training {job.name}: {result.epochs} epochs, {result.steps} steps")
    print(f"  checkpoint: {result.checkpoint_uri}")
    print(f"  MLflow run: {result.run_id} ({job.tracking_uri}, experiment {job.experiment})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
