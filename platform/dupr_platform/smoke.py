"""The smoke run of a study (`smoke=true`): every stage of its configuration, for a few steps.

    python pipelines/pretrain_and_eval.py preset=paper_r50_imagenet smoke=true
    python pipelines/ablate.py --grid roi preset=paper_r50_imagenet smoke=true

Before a multi-day GPU job is queued, the smoke run builds every stage exactly as configured
(backbone, image size, K keys per bank, the detector and its scales, the evaluations' sizes)
and runs each for `SMOKE_STEPS` steps on a small slice of the configured data, or of the
bundled sets where the data is absent (`configs.compose` nulls a preset's unset `${oc.env:…}`
data locations), on whatever device the cluster has: one worker, the full per-device batch on
a GPU and a small one on a CPU. It shows each stage's step time and peak memory, projects the
memory to the full per-device batch, and estimates the full run's GPU-hours. It fails (exit
status 1) on what would fail at full size: a shape or format error in any stage, a checkpoint
that does not convert or load, a class of the detection set without training boxes, or a
projected peak above `estimate.device_memory_gib`.

`prepare` and `fit` derive the smoke run's config from the study's; the stages measure
themselves when their context says `profile` (`profiled`, `PeakMemory`); `report` turns their
numbers into the table and the estimate. Its runs go to the experiment `<experiment>-smoke`
and its files to `<storage>/smoke`, apart from the study's.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import hashlib
import math
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dupr.io import markdown_table
from dupr.train import StepGraph

SMOKE_STEPS = 3  # per stage; the first warms up (allocation, autotuning) and is not timed
SMOKE_IMAGES = 4  # per split, for the evaluations that read images (detection: 2 to evaluate)
# On a CPU, where the full per-device batch would take minutes per step: a smaller batch, from
# which the memory is projected, and one fine-tuning iteration (an 800-pixel R50-C4 iteration
# takes most of a minute on 2 cores; a CPU's estimate comes from counted FLOPs, not from its
# step times). A GPU smoke run uses the full per-device batch and `SMOKE_STEPS` everywhere.
CPU_BATCH = {"pretrain": 2, "detection": 1}
CPU_DETECTION_STEPS = 1
PROFILE = "profile/"  # the prefix of the metrics a profiled stage reports


# ---------------------------------------------------------------------------------------------
# Measuring a stage


class PeakMemory:
    """The peak memory between `start` and `stop`, in GiB: on a GPU what the CUDA allocator
    reserved at most (what the device must hold, which the allocated peak understates by the
    allocator's fragmentation; the CUDA context and NCCL's buffers, a few hundred MB, are
    outside both); on a CPU the process's peak resident set above what it held at `start` (a
    Ray worker process may have held more for an earlier task). Linux keeps that peak exactly
    (VmHWM, reset at `start`); elsewhere the resident set is sampled every 5 ms, which can
    miss a short peak on a busy machine."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_gib = 0.0
        self._stop = threading.Event()
        self._start = self._max = 0
        self._kernel_peak = False
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Memory an earlier task freed may still be resident (glibc keeps freed heap memory
            # for reuse), and allocations served from it would not show as growth: hand it back
            # to the kernel first (seen in the test suite: a 256 MiB block added 0 bytes).
            gc.collect()
            _release_free_heap()
            self._start = self._max = _rss()
            self._kernel_peak = reset_peak_rss()
            if not self._kernel_peak:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss())

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gib = torch.cuda.max_memory_reserved(self.device) / 2**30
        elif self._kernel_peak:
            self.peak_gib = (proc_status_bytes("VmHWM") - self._start) / 2**30
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak_gib = (self._max - self._start) / 2**30
        return self.peak_gib


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): return the heap's free memory to the kernel; elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current one (Linux >= 4.0), so that
    the peak read later is that of what ran since; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(field: str) -> int:
    """A `VmRSS` / `VmHWM` style field of /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _rss() -> int:
    """The process's resident set in bytes (Linux /proc; elsewhere its lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def untimed_steps(cuda_graph: bool, on_gpu: bool) -> int:
    """Pre-training steps before the timed ones: the first (allocation, autotuning) and, with
    `optim.cuda_graph` on a GPU, `StepGraph`'s eager warm-up and the step that captures, so that
    a smoke run captures the graph and times its replays."""
    return 1 + (StepGraph.WARMUP_STEPS + 1 if cuda_graph and on_gpu else 0)


@dataclass
class StepTimer:
    """Seconds between consecutive calls of `tick` (a loop's per-step log callback)."""

    untimed: int = 1  # the first steps, left out of `step_s` (`untimed_steps`)
    times: list[float] = field(default_factory=list)
    _last: float = field(default_factory=time.perf_counter)

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now

    def step_s(self) -> float:
        """The median step after the untimed ones; the last alone if there is no other."""
        timed = self.times[self.untimed :] or self.times[-1:]
        return statistics.median(timed) if timed else math.nan


@contextlib.contextmanager
def flops_counted(device: torch.device | None) -> Iterator[dict[str, float]]:
    """The block's FLOPs (`total`), counted by torch.utils.flop_counter on a CPU. Counting adds
    Python work per operator, which a CPU's step times hide and a GPU's would not, so a GPU
    run (or `device` None) is not counted: its step times are measured instead."""
    from torch.utils.flop_counter import FlopCounterMode

    counts: dict[str, float] = {}
    if device is None or device.type != "cpu":
        yield counts
        return
    counter = FlopCounterMode(display=False)
    with counter:
        yield counts
    counts["total"] = float(counter.get_total_flops())


def profile_metrics(
    device: torch.device,
    batch: int,
    peak_gib: float,
    step_s: float = math.nan,
    flops: float | None = None,
    steps: int = 0,
) -> dict[str, float]:
    """A profiled stage's `profile/*` metrics; `batch` 0 for a stage without training steps."""
    metrics = {
        PROFILE + "peak_memory_gib": peak_gib,
        PROFILE + "batch": float(batch),
        PROFILE + "on_gpu": float(device.type == "cuda"),
    }
    if device.type == "cuda":  # the budget when estimate.device_memory_gib is not set
        total = torch.cuda.get_device_properties(device).total_memory
        metrics[PROFILE + "device_memory_gib"] = total / 2**30
    if not math.isnan(step_s):
        metrics[PROFILE + "step_s"] = step_s
    if flops and steps:
        metrics[PROFILE + "gflop_per_step"] = flops / steps / 1e9
    return metrics


@contextlib.contextmanager
def profiled(device: torch.device) -> Iterator[dict[str, float]]:
    """A stage without training steps (an evaluation, a conversion): its peak memory."""
    metrics: dict[str, float] = {}
    memory = PeakMemory(device).start()
    try:
        yield metrics
    finally:
        metrics.update(profile_metrics(device, 0, memory.stop()))


# ---------------------------------------------------------------------------------------------
# The smoke run's config


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The smoke run's config, before the cluster is known: its own name, experiment and
    storage folder; one seed; every stage `SMOKE_STEPS` steps long on `SMOKE_IMAGES` images.
    Random initialisation is left out: it runs the model's code on the model's shapes."""
    from dupr_platform.storage import open_storage

    cfg = copy.deepcopy(cfg)
    cfg["name"] = f"{cfg['name']}-smoke"
    cfg["experiment"] = f"{cfg['experiment']}-smoke"
    cfg["storage"] = open_storage(cfg["storage"]).uri_for("smoke")
    cfg["seeds"] = None
    cfg["baselines"]["random"] = False
    if cfg["baselines"].get("reference") == "random":
        cfg["baselines"]["reference"] = None
    pretrain = cfg["pretrain"]
    pretrain["log_every"] = 1
    pretrain["profile"] = True
    pretrain["method"]["optim"].update(epochs=1, warmup_epochs=0.0)
    ev = cfg["eval"]
    for kind in ("spatial", "correspondence", "object_probe", "probe"):
        ev[kind]["max_images"] = min(ev[kind].get("max_images") or SMOKE_IMAGES, SMOKE_IMAGES)
    det = ev["detection"]
    det.update(iterations=SMOKE_STEPS, warmup_iters=min(det["warmup_iters"], 1), log_every=1)
    return cfg


def fit(cfg: dict[str, Any], cluster: dict[str, float]) -> dict[str, Any]:
    """The smoke run's config for the connected cluster (`ray.cluster_resources()`): one
    pre-training worker, on a GPU if there is one, with the full per-device batch there and
    `CPU_BATCH` otherwise; CPUs and Ray Data decoders cut to what the cluster has; the
    pre-training data a slice of `SMOKE_STEPS` batches of the configured images (more with
    `optim.cuda_graph` on a GPU: `untimed_steps`)."""
    cfg = copy.deepcopy(cfg)
    cpus, gpu = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0) >= 1
    p = cfg["pretrain"]
    optim = p["method"]["optim"]
    per_device = optim["batch_size"] // p["num_workers"]
    p["num_workers"] = 1
    p["use_gpu"] = bool(p["use_gpu"] and gpu)
    p["gpus_per_worker"] = min(p["gpus_per_worker"], 1.0)
    optim["batch_size"] = per_device if p["use_gpu"] else min(per_device, CPU_BATCH["pretrain"])
    if p["data_loader"] == "ray":
        # The worker, one decoding task and Ray Data's listing task (one CPU) fit.
        share = max(0.25, (cpus - 1) / 2)
        p["ray_data_decoders"] = 1
        p["ray_data_cpus_per_decoder"] = min(p["ray_data_cpus_per_decoder"], share)
        p["cpus_per_worker"] = min(p["cpus_per_worker"], share)
    else:
        p["cpus_per_worker"] = min(p["cpus_per_worker"], cpus)
    p["loader_workers"] = min(p["loader_workers"], 1)
    steps = SMOKE_STEPS - 1 + untimed_steps(optim["cuda_graph"], p["use_gpu"])
    p["data"] = pretrain_slice(p["data"], optim["batch_size"] * steps, cfg["storage"])
    ev = cfg["eval"]
    ev["resources"]["cpus"] = min(float(ev["resources"]["cpus"]), cpus)
    if ev["resources"]["gpus"] != "auto":
        ev["resources"]["gpus"] = min(float(ev["resources"]["gpus"]), 1.0 if gpu else 0.0)
    if not gpu:
        det = ev["detection"]
        det["batch_size"] = min(det["batch_size"], CPU_BATCH["detection"])
        det["iterations"] = CPU_DETECTION_STEPS
    return cfg


def pretrain_slice(data: str | None, n: int, storage: str) -> str:
    """The first `n` images of the pre-training data (None: the bundled photos) as Parquet
    shards under `storage`, written once per source and size."""
    from dupr.data.bundled import bundled_image_folder
    from dupr.data.folder import is_image_file, list_image_files
    from dupr_platform.ray_pretrain import is_shards
    from dupr_platform.shards import INDEX_NAME, ParquetImageDataset, prepare_shards
    from dupr_platform.storage import open_storage, uri_exists

    source = data or str(bundled_image_folder())
    digest = hashlib.sha256(f"{source}\n{n}".encode()).hexdigest()[:12]
    dest = open_storage(storage).uri_for(f"data/pretrain-{n}-{digest}")
    if uri_exists(open_storage(dest).uri_for(INDEX_NAME)):
        return dest
    if is_shards(source):
        shards = ParquetImageDataset(source)
        count = len(shards)
        files = ((r.id, r.image) for r in map(shards.record, range(min(n, count))))
    else:
        paths = list_image_files(Path(source))
        count = len(paths)
        files = ((p.name, p.read_bytes()) for p in paths[:n])
    if count < n:
        return source  # smaller than the slice: itself (check_data names the problem)
    with tempfile.TemporaryDirectory(prefix="dupr-smoke-") as tmp:
        for i, (name, image) in enumerate(files):
            name = Path(name).name
            if not is_image_file(name):  # prepare_shards lists files by extension
                name += ".jpg"
            (Path(tmp) / f"{i:06d}-{name}").write_bytes(image)
        prepare_shards(tmp, dest, images_per_shard=max(n, 1))
    return dest


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class StageFigures:
    """One stage's smoke measurements and what they mean at full size."""

    name: str
    status: str
    device: str = ""
    batch: str = ""
    step_s: float = math.nan
    peak_gib: float = math.nan
    projected_gib: float = math.nan
    full_steps: float = math.nan
    gpu_hours: float = math.nan
    basis: str = ""


def _epoch_images(data: str | None, given: int | None) -> int:
    """One full pre-training epoch's images: counted from the data when it is there, else
    `estimate.pretrain_images`, else the bundled photos' (the stand-in's) count."""
    from dupr.data.bundled import bundled_image_folder
    from dupr_platform.ray_pretrain import open_images

    if data is None and given:
        return int(given)
    return len(open_images(data or str(bundled_image_folder())))


def figures(study: dict[str, Any], reports: list[Any]) -> tuple[list[StageFigures], list[str]]:
    """Each stage's figures, and the failures the smoke run found: a projected peak above
    the memory budget. `study` is the full run's config; `reports` the smoke run's stages."""
    est = study["estimate"]
    tflops = float(est["device_tflops"])
    seeds = len(study.get("seeds") or [None])
    p = study["pretrain"]
    full_batch = {
        "pretrain": p["method"]["optim"]["batch_size"] // p["num_workers"],
        "detection": study["eval"]["detection"]["batch_size"],
    }
    rows, failures = [], []
    for r in reports:
        kind = r.name.split("/")[0]
        m = r.metrics
        f = StageFigures(r.name, r.status)
        if PROFILE + "peak_memory_gib" not in m:
            rows.append(f)
            continue
        gpu = bool(m.get(PROFILE + "on_gpu"))
        f.device = "GPU" if gpu else "CPU"
        f.peak_gib = m[PROFILE + "peak_memory_gib"]
        f.step_s = m.get(PROFILE + "step_s", math.nan)
        batch = int(m.get(PROFILE + "batch", 0))
        if kind in full_batch and batch:
            scale = full_batch[kind] / batch
            f.batch = f"{batch} (full {full_batch[kind]})"
            f.projected_gib = (
                f.peak_gib * scale
            )  # activations scale, weights do not: an upper bound
            # Seconds per step on one device of the full run.
            if gpu:
                per_step = f.step_s * scale
                f.basis = "measured step time"
            else:
                per_step = m.get(PROFILE + "gflop_per_step", math.nan) * scale / (tflops * 1e3)
                f.basis = f"counted FLOPs at {tflops:g} TFLOP/s"
            if kind == "pretrain":
                n = _epoch_images(p["data"], est.get("pretrain_images"))
                epochs = p["method"]["optim"]["epochs"]
                f.full_steps = epochs * (n // p["method"]["optim"]["batch_size"])
                f.gpu_hours = f.full_steps * per_step * p["num_workers"] / 3600
                f.basis += f"; {n:,} images per epoch"
            else:
                f.full_steps = study["eval"]["detection"]["iterations"]
                f.gpu_hours = f.full_steps * per_step / 3600
            f.gpu_hours *= seeds  # every seed repeats it
            # The budget: the full run's devices, or the GPU the stage ran on; none on a CPU.
            budget = est.get("device_memory_gib") or m.get(PROFILE + "device_memory_gib")
            if budget is not None and f.projected_gib > budget:
                failures.append(
                    f"{r.name}: peak memory {f.projected_gib:.1f} GiB projected at the full "
                    f"per-device batch of {full_batch[kind]} exceeds "
                    f"{'estimate.device_memory_gib=' if est.get('device_memory_gib') else ''}"
                    f"{budget:.0f} GiB (measured {f.peak_gib:.2f} GiB at batch {batch})"
                )
        else:
            f.batch = "-"
            f.projected_gib = f.peak_gib
            f.basis = "inference on the slice; not estimated"
        rows.append(f)
    return rows, failures


def total_gpu_hours(study: dict[str, Any], rows: list[StageFigures]) -> float:
    """The full run's GPU-hours: the smoke run's estimate per stage, with the random
    initialisation's detection fine-tunings (left out of the smoke run) counted like the
    model's."""
    total = 0.0
    random = bool(study["baselines"].get("random", True))
    for f in rows:
        if math.isnan(f.gpu_hours):
            continue
        total += f.gpu_hours
        if random and f.name.startswith("detection/") and f.name.endswith("/" + _label(study)):
            total += f.gpu_hours
    return total


def _label(study: dict[str, Any]) -> str:
    return study["pretrain"].get("label", "dupr")


def report(study: dict[str, Any], reports: list[Any]) -> tuple[str, list[str]]:
    """The smoke run's table and estimate (markdown), and its failures."""
    rows, failures = figures(study, reports)
    table = markdown_table(
        [
            [
                f.name,
                f.status,
                f.device,
                f.batch,
                _fmt(f.step_s, "{:.2f}"),
                _fmt(f.peak_gib, "{:.2f}"),
                _fmt(f.projected_gib, "{:.1f}"),
                _fmt(f.full_steps, "{:,.0f}"),
                _fmt(f.gpu_hours, "{:,.1f}"),
                f.basis,
            ]
            for f in rows
        ],
        [
            "stage",
            "status",
            "device",
            "batch per device",
            "step s",
            "peak GiB",
            "peak GiB at full batch",
            "full-run steps",
            "GPU-hours (estimate)",
            "basis",
        ],
        pad=True,
    )
    total = total_gpu_hours(study, rows)
    lines = [
        f"smoke run of {study['name']}: every stage for at most {SMOKE_STEPS} steps on a "
        "slice of its data (bundled stand-ins where it is absent)",
        "",
        table,
        "",
        f"ESTIMATE, not a measurement: the full run needs about {total:,.0f} GPU-hours "
        "(pre-training and detection fine-tuning; the analyses, inference on a bounded number "
        "of images, are not counted). FLOP-based hours assume every stage reaches "
        "estimate.device_tflops: a floor for detection, which reaches less. Peak memory at "
        "the full batch is projected linearly from the smoke batch, an upper bound.",
    ]
    if failures:
        lines += ["", *[f"FAILED at full size: {x}" for x in failures]]
    return "\n".join(lines), failures


def _fmt(value: float, pattern: str) -> str:
    return "" if value is None or math.isnan(value) else pattern.format(value)
