"""The framework-neutral training step and loop (no Ray, no MLflow): SGD, cosine schedule, AMP.

A launcher (the plain `dupr.local_pretrain` script, or the Ray Train worker in the platform) builds a
`TrainState`, restores it from a checkpoint if there is one, and calls `train()` with callbacks
for logging and checkpointing. `TrainState.state_dict()` holds everything needed to continue a
run exactly: model with memory banks, optimizer, scheduler, AMP scaler, epoch and step, and the
random generators; the data order and augmentation are functions of (seed, epoch, index).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from dupr.config import OptimConfig
from dupr.losses import info_nce
from dupr.photometric import apply_photometric

if TYPE_CHECKING:
    from dupr.model import DUPR


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD over the trainable (query-side) parameters, as MoCo: weight decay on all of them.

    On a GPU the fused implementation: one kernel for the whole update, and the one that can
    read its learning rate from a device tensor, which a CUDA graph needs (`StepGraph`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 (per step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))


def rng_state() -> dict[str, Any]:
    """The generators a step draws from; of CUDA's, this process's device's only (a rank that
    comes back on another GPU, or on a node with fewer, takes its own stream along)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """`rng_state`'s generators back, wherever torch.load's map_location put their tensors
    (PyTorch takes generator states as CPU byte tensors only)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


@dataclass
class TrainState:
    """Everything a run carries from one step to the next."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    graph: StepGraph | None = None  # the captured step, with optim.cuda_graph (not saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng"} - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {', '.join(sorted(missing))}")
        unwrap(self.model).load_state_dict(state["model"])
        # How the update is computed belongs to this process's device, not to the checkpoint's
        # (a run saved on a CPU, foreach, resumes fused on a GPU); the numbers are the same.
        implementation = {key: self.optimizer.defaults[key] for key in ("foreach", "fused")}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(implementation)
        self.scheduler.load_state_dict(state["scheduler"])
        # Saved where no loss scaler runs (a CPU, bfloat16), the scaler's state is empty; resumed
        # with float16 on a GPU, the scaler starts afresh (its scale settles within a few
        # steps): GradScaler refuses an empty state ("saved from a disabled instance").
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        set_rng_state(state["rng"])


def compile_model(
    model: DUPR, mode: str = "default", losses: bool = True, backbones: bool = False
) -> None:
    """torch.compile the heads of both encoders and, with `losses`, the InfoNCE losses, in
    place (``optim.compile``; `mode` is torch.compile's). `backbones` compiles the ResNets too,
    fusing their BatchNorms, ReLUs and residual additions (memory-bound work, most of a ResNet
    step's GPU time); a benchmark lever (benchmarks/gpu_step.py), not a training option: on the
    CPU, inductor (torch 2.14.1) gives a compiled ResNet's convolution weights gradients 6-18 %
    off, and tests/test_cuda.py checks them on a GPU first.

    On an H200 this took DUPR's step from 85.1 to 67.7 ms as configured by default and from
    52.7 to 48.0 ms with the attention kernel and bf16 logits (benchmarks/RESULTS.md), after
    38-135 s of compiling. By default the backbones stay eager (cuDNN runs their convolutions
    already). Modules are compiled in place, so parameter names and checkpoints do not change;
    the losses have static shapes (every cell goes through the patch loss). `info_nce` is
    compiled rather than `DUPR.patch_loss`: inside a compiled `patch_loss`, the partitioner
    saves the memory bank itself for backward instead of its snapshot, and the enqueue that
    follows modifies it in place. Call it before wrapping the model in DDP.
    """
    # Eight heads share two forward functions, called with and without grad: one compiled
    # graph per (head, grad mode) is expected, more than dynamo's default limit of 8.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    for encoder in (model.encoder_q, model.encoder_k):
        modules = [*encoder.image_heads.values(), *encoder.patch_heads.values()]
        for module in modules + ([encoder.backbone] if backbones else []):
            module.compile(mode=mode)
    if losses:
        model.info_nce = torch.compile(info_nce, dynamic=False)


def build_state(
    model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, device: torch.device
) -> TrainState:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick kernels once
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    # A loss scaler is only needed for float16 autocast on a GPU; bfloat16 has float32's range.
    use_scaler = device.type == "cuda" and cfg.amp and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return TrainState(model, optimizer, scheduler, scaler)


def to_device(
    batch: dict[str, Any], device: torch.device, channels_last: bool, compiled: bool = False
) -> tuple:
    """The batch's views and crop records on `device`; views that left the loader as uint8
    crops with their colour choices (``augment.photometric_on=device``) get their colour steps
    here, compiled with ``optim.compile``."""
    views = [batch[f"view{v}"].to(device, non_blocking=True) for v in ("1", "2")]
    if "photometric1" in batch:
        # Both views in one call: the colour steps are many small operations per call, whose
        # launches, not their arithmetic, are most of their cost on a GPU.
        rows = torch.cat([batch["photometric1"], batch["photometric2"]])
        views = list(apply_photometric(torch.cat(views), rows, compiled).chunk(2))
    if channels_last:
        views = [x.contiguous(memory_format=torch.channels_last) for x in views]
    crops = [batch[key].to(device, non_blocking=True) for key in ("crop1", "crop2")]
    return views[0], views[1], crops[0], crops[1]


def optimizer_step(
    state: TrainState,
    inputs: tuple[torch.Tensor, ...],
    cfg: OptimConfig,
    device: torch.device,
    autocast_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Forward, backward and the SGD update on a batch already on the device: the work a
    CUDA graph captures. Returns the model's detached metrics."""
    amp = cfg.amp and device.type == "cuda"
    dtype = getattr(torch, cfg.amp_dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=amp, cache_enabled=autocast_cache):
        loss, metrics = state.model(*inputs)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return metrics


class StepGraph:
    """`optimizer_step` captured once as a CUDA graph and replayed for every later batch
    (``optim.cuda_graph``).

    Why: at a per-GPU batch of 64 the host launches a step's kernels more slowly than the GPU
    runs them (an H200 took 27-34 ms for MoCo v2's 23.4 ms of GPU work, benchmarks/RESULTS.md),
    and one graph launch replaces them all. The step can be captured because it never makes the
    host wait for the device (tests/test_train.py) and none of its shapes depends on the data.
    Each call copies the batch into the graph's static inputs and the learning rate, which the
    schedule changes every step, into the device tensor the captured SGD update reads; the
    optimizer's param groups keep their float, so checkpoints do not change. The first
    `warmup_steps` steps run eagerly on a side stream (cuDNN's autotuning, torch.compile, SGD's
    momentum buffers), as PyTorch's recipe for capturing a whole network asks.

    On a CPU, which has no graphs, the same static-input step runs eagerly each call, so the
    option behaves the same everywhere. One process only: the collectives of DDP and Shuffle
    BN are not captured (`dupr_platform.ray_pretrain.PretrainSettings.validate`).
    """

    WARMUP_STEPS = 3  # eager, on a GPU, before the step that captures

    def __init__(self, state: TrainState, cfg: OptimConfig, device: torch.device) -> None:
        self.state, self.cfg, self.device = state, cfg, device
        self.warmup_steps = self.WARMUP_STEPS if device.type == "cuda" else 0
        self.eager_steps = 0
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.lr = torch.zeros((), dtype=torch.float32, device=device)  # fused SGD reads float32
        self.names: list[str] = []
        self.packed = torch.zeros(0, device=device)  # the metrics, stacked (a static output)
        self.replay: Callable[[], object] | None = None

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        if self.replay is None and self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # As captured (autocast's cache off): torch.compile's guards see the same state,
                # so nothing is compiled anew while the graph records.
                metrics = optimizer_step(
                    self.state, inputs, self.cfg, self.device, autocast_cache=False
                )
            torch.cuda.current_stream(self.device).wait_stream(side)
            return metrics
        if self.replay is None:
            self.inputs = tuple(x.clone() for x in inputs)  # same shapes, strides and dtypes
            self.replay = self._capture() if self.device.type == "cuda" else self._step
        else:
            for static, x in zip(self.inputs, inputs, strict=True):
                static.copy_(x, non_blocking=True)
        self.lr.fill_(self.state.optimizer.param_groups[0]["lr"])
        self.replay()
        # A copy: the next replay overwrites the static output while the loop still holds it.
        return dict(zip(self.names, self.packed.clone().unbind(), strict=True))

    def _step(self) -> None:
        """One optimizer step on the static inputs, reading the learning rate from `self.lr`
        (`build_optimizer` makes one param group, whose learning rate `__call__` copies)."""
        groups = self.state.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self.lr
        try:
            # Autocast's cache of cast weights would keep graph memory alive across replays.
            metrics = optimizer_step(
                self.state, self.inputs, self.cfg, self.device, autocast_cache=False
            )
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr
        self.names = sorted(metrics)
        self.packed = torch.stack([metrics[name].float() for name in self.names])

    def _capture(self) -> Callable[[], object]:
        """Record `_step` as a CUDA graph; returns its replay. Recording runs nothing."""
        graph = torch.cuda.CUDAGraph()
        self.state.optimizer.zero_grad(set_to_none=True)  # gradients then live in the graph
        # "thread_local": a loader's pin-memory thread may allocate while this one records.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        return graph.replay


def train_step(
    state: TrainState, batch: dict[str, Any], cfg: OptimConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of view pairs; returns detached metrics (no host sync)."""
    inputs = to_device(batch, device, cfg.channels_last, cfg.compile)
    if cfg.cuda_graph:
        if state.graph is None:
            state.graph = StepGraph(state, cfg, device)
        metrics = state.graph(inputs)
    else:
        metrics = optimizer_step(state, inputs, cfg, device)
    # Filled on the device like the other metrics (no host-to-device copy at logging time).
    metrics["lr"] = torch.full((), state.optimizer.param_groups[0]["lr"], device=device)
    state.scheduler.step()
    state.step += 1
    return metrics


StepCallback = Callable[[int, dict[str, float]], None]
EpochCallback = Callable[[TrainState], None]


class BatchLoader(Protocol):
    """What `train` needs of a loader: a DataLoader over an `EpochSampler`, or an adapter with
    the same attributes (the platform's Ray Data loader)."""

    @property
    def drop_last(self) -> bool: ...

    @property
    def batch_size(self) -> int | None: ...

    @property
    def sampler(self) -> object: ...  # a ResumableSampler

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __len__(self) -> int: ...  # batches per epoch


class ResumableSampler(Protocol):
    """What `train` needs of the loader's sampler: `EpochSampler` (or the Ray Data adapter's)."""

    def samples_per_replica(self) -> int: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


def _mean_metrics(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average a window of per-step metrics (and over ranks) with one device→host transfer.

    NaN entries (a patch accuracy of a step without overlapping pairs) are ignored locally.
    """
    keys = sorted(window[0])
    device = window[0]["loss"].device
    stacked = torch.stack([torch.stack([m[k].float().to(device) for k in keys]) for m in window])
    means = stacked.nanmean(dim=0)
    if dist.is_available() and dist.is_initialized():
        # Averaged over ranks too, so the logged loss is that of the global batch.
        dist.all_reduce(means)
        means /= dist.get_world_size()
    return dict(zip(keys, means.tolist(), strict=True))


def train(
    state: TrainState,
    loader: BatchLoader,
    cfg: OptimConfig,
    device: torch.device,
    *,
    global_batch: int | None = None,
    log_every: int = 10,
    on_log: StepCallback | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainState:
    """Train from `state.epoch`/`state.step` to `cfg.epochs`.

    The loader's sampler must have ``set_epoch(epoch, start)`` (`EpochSampler`); a state saved in
    the middle of an epoch resumes at the next unseen batch. `on_log` receives the step and the
    metrics averaged over the last `log_every` steps, plus throughput (images/s over all
    workers), the time spent waiting for data, and the number of undecodable files skipped.
    `on_epoch_end` is where checkpoints are written. A non-finite loss stops training with
    FloatingPointError before the next checkpoint, so a diverged model is never saved.
    """
    if not loader.drop_last:
        raise ValueError("the loader needs drop_last=True: Shuffle BN needs equal per-rank batches")
    if loader.batch_size is None:
        raise ValueError("the loader needs a batch_size (not a batch_sampler)")
    batch_size: int = loader.batch_size
    sampler = cast(ResumableSampler, loader.sampler)
    steps_per_epoch = sampler.samples_per_replica() // batch_size
    global_batch = global_batch or batch_size
    state.model.train()
    while state.epoch < cfg.epochs:
        done_in_epoch = state.step - state.epoch * steps_per_epoch
        sampler.set_epoch(state.epoch, start=done_in_epoch * batch_size)
        window: list[dict[str, torch.Tensor]] = []
        data_wait, skipped, tick = 0.0, 0, time.perf_counter()
        fetch = time.perf_counter()
        for batch in loader:
            data_wait += time.perf_counter() - fetch
            skipped += int(batch["skipped"].sum())
            window.append(train_step(state, batch, cfg, device))
            if len(window) == log_every or state.step % steps_per_epoch == 0:
                logged = _mean_metrics(window)
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss {logged['loss']} at step {state.step}"
                    )
                elapsed = time.perf_counter() - tick
                logged |= {
                    "images_per_s": len(window) * global_batch / elapsed,
                    "data_wait_s": data_wait / len(window),
                    "skipped_files": float(skipped),
                    "epoch": state.step / steps_per_epoch,
                }
                if on_log:
                    on_log(state.step, logged)
                window, data_wait, skipped, tick = [], 0.0, 0, time.perf_counter()
            fetch = time.perf_counter()
        state.epoch += 1
        if on_epoch_end:
            on_epoch_end(state)
    return state
