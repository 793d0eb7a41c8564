"""DUPR vs MoCo v2 training-step throughput on one GPU, with each speed lever as its own row.

    python benchmarks/gpu_step.py                       # ResNet-50, 224 px, batch 64, K=65536
    python benchmarks/gpu_step.py --record benchmarks/RESULTS.md
    python benchmarks/gpu_step.py --quick --device cpu  # rehearsal of the script itself (~1 min)
    python benchmarks/gpu_step.py --flops-only --device cpu --batch 8  # FLOPs, any machine

Needs only torch and torchvision (the repository root is put on sys.path). Every variant runs
the same `dupr.train.train_step` (SGD, bf16 autocast unless a row says float16, channels_last)
on batches already on the GPU, so the numbers are the model's cost: backbone twice (query and
momentum key encoder), heads, RoIAlign, the losses against K-key memory banks, and the enqueue.
Crop records come from real RandomResizedCrop draws, so the patch loss sees the usual mix of
overlap sizes. All variants alternate over rounds (order reversed every other round) and each
one's median step time is compared with MoCo v2's in the same run.

Variants (rows): MoCo v2 (the baseline); DUPR as configured by default (float32 patch logits,
chunked matmuls); and one row per lever on the patch loss's cost:

  bf16 logits        model.patch_logits=bfloat16 (bf16 matmuls, float32 log-sum-exp)
  attention kernel   model.patch_loss_kernel=attention (fused kernel, logits never stored)
  attention + bf16   both (the flash-attention kernel)
  matmul RoIAlign    model.roi_align_kernel=matmul (RoIAlign as two matmuls in the map's dtype
                     and layout, dupr.roi_align), alone and with attention + bf16
  cuDNN attention    model.patch_loss_kernel=cudnn_attention: the same with cuDNN's attention
                     kernel in place of flash attention (bf16 logits only)
  compile            optim.compile: torch.compile of the heads and losses (dupr.train.compile_model)
  attention + bf16 (+ matmul RoIAlign) + compile   the best eager levers, compiled the same way
  CUDA graph         optim.cuda_graph: the whole step (forward, backward, SGD) captured once and
                     replayed as one CUDA graph (dupr.train.StepGraph), for MoCo v2 and for the
                     best DUPR levers, eager and compiled: what the step costs without the host's
                     kernel launches
  compile all        the backbones compiled too (BatchNorm, ReLU and the residual additions
                     fused), for MoCo v2 and for the best DUPR levers, with and without the graph
  float16            optim.amp_dtype=float16 (autocast to float16, with the loss scaler) for
                     MoCo v2 and for the best DUPR levers: PyTorch runs bfloat16 BatchNorm in
                     its own kernels and float16 in cuDNN's (_select_batch_norm_backend in
                     ATen), and its own took 10 ms of MoCo v2's 23.4 ms of GPU time per step in
                     run 4's profile (benchmarks/RESULTS.md); the scaler's check for infinite
                     gradients adds one host-device synchronisation per step

The levers MoCo v2 takes too (the CUDA graph, compiled backbones, float16) are judged fairly: a
DUPR row with them is compared with MoCo v2 with the same ones (its twin, which every run adds).

A variant that fails (an unsupported kernel, a compiler error) gets its error in its row; the
others still run. Each method's FLOPs per image are counted once (torch.utils.flop_counter on
one step of the default form; convolution and matmul FLOPs, forward and backward), so the table
gives the FLOP ratio, which bounds the step-time ratio where the GPU is compute-bound, and the
achieved model TFLOP/s (the default form's FLOPs over each variant's time) as a fraction of the
card's dense bf16 peak and of a bf16 matmul measured in the same run.

Targets (issue 14): DUPR >= 2,000 images/s on one H100 (an H200 stated as such) and DUPR /
MoCo v2 step time <= 1.25 (against its twin), met by the best variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_model_arguments, machine_lines, record, report, resolve_device  # noqa: E402

from dupr.config import OptimConfig, preset, validate  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.model import DUPR  # noqa: E402
from dupr.train import TrainState, build_state, compile_model, train_step  # noqa: E402
from dupr.views import CropAndFlip  # noqa: E402

TARGET_IMAGES_PER_S = 2000
TARGET_RATIO = 1.25
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets.
BF16_PEAK = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

BASELINE, DEFAULT = "mocov2", "dupr"
ATTENTION_BF16 = {"patch_loss_kernel": "attention", "patch_logits": "bfloat16"}
MATMUL_ROI = {"roi_align_kernel": "matmul"}
BEST = "dupr + attention + bf16 + matmul RoIAlign"  # the best eager levers together
CUDNN_BF16 = {"patch_loss_kernel": "cudnn_attention", "patch_logits": "bfloat16"}
CUDNN_BEST = "dupr + cuDNN attention + bf16 + matmul RoIAlign"  # the same, cuDNN's kernel


class Variant(NamedTuple):
    method: str  # the preset
    model: dict  # model overrides
    compiled: dict | None = None  # dupr.train.compile_model's arguments; None: eager
    graph: bool = False  # optim.cuda_graph: the whole step replayed as one CUDA graph
    amp_dtype: str = "bfloat16"  # optim.amp_dtype

    def shared_levers(self) -> tuple[bool, bool, str]:
        """The levers that are not DUPR's own: MoCo v2 takes them too (compiled backbones, the
        CUDA graph, float16); a DUPR row is judged against MoCo v2 with the same ones (`twin`)."""
        return bool(self.compiled and self.compiled.get("backbones")), self.graph, self.amp_dtype


VARIANTS: dict[str, Variant] = {
    BASELINE: Variant("mocov2", {}),
    DEFAULT: Variant("dupr", {}),
    "dupr + bf16 logits": Variant("dupr", {"patch_logits": "bfloat16"}),
    "dupr + attention kernel": Variant("dupr", {"patch_loss_kernel": "attention"}),
    "dupr + attention + bf16": Variant("dupr", ATTENTION_BF16),
    "dupr + matmul RoIAlign": Variant("dupr", MATMUL_ROI),
    BEST: Variant("dupr", ATTENTION_BF16 | MATMUL_ROI),
    "dupr + compile": Variant("dupr", {}, {}),
    "dupr + attention + bf16 + compile": Variant("dupr", ATTENTION_BF16, {}),
    f"{BEST} + compile": Variant("dupr", ATTENTION_BF16 | MATMUL_ROI, {}),
    CUDNN_BEST: Variant("dupr", CUDNN_BF16 | MATMUL_ROI),
    "mocov2 + CUDA graph": Variant("mocov2", {}, graph=True),
    f"{BEST} + CUDA graph": Variant("dupr", ATTENTION_BF16 | MATMUL_ROI, graph=True),
    f"{BEST} + compile + CUDA graph": Variant("dupr", ATTENTION_BF16 | MATMUL_ROI, {}, True),
    f"{CUDNN_BEST} + CUDA graph": Variant("dupr", CUDNN_BF16 | MATMUL_ROI, graph=True),
    "mocov2 + compile all": Variant("mocov2", {}, {"backbones": True}),
    f"{BEST} + compile all": Variant("dupr", ATTENTION_BF16 | MATMUL_ROI, {"backbones": True}),
    "mocov2 + compile all + CUDA graph": Variant("mocov2", {}, {"backbones": True}, True),
    f"{BEST} + compile all + CUDA graph": Variant(
        "dupr", ATTENTION_BF16 | MATMUL_ROI, {"backbones": True}, True
    ),
    f"{CUDNN_BEST} + compile all + CUDA graph": Variant(
        "dupr", CUDNN_BF16 | MATMUL_ROI, {"backbones": True}, True
    ),
    "mocov2 + float16": Variant("mocov2", {}, amp_dtype="float16"),
    f"{BEST} + float16": Variant("dupr", ATTENTION_BF16 | MATMUL_ROI, amp_dtype="float16"),
}


# The rows whose operators show one by one (gpu_profile.py, step_operators.py): compiled code
# and graph replays hide them.
EAGER = [n for n, v in VARIANTS.items() if v.compiled is None and not v.graph]


def add_eager_variants_argument(parser: argparse.ArgumentParser) -> None:
    """--variants for the scripts that look inside a step: eager rows only, by default MoCo
    v2, DUPR as configured by default, and its best eager levers without and with the matmul
    RoIAlign."""
    parser.add_argument(
        "--variants",
        default=",".join([BASELINE, DEFAULT, "dupr + attention + bf16", BEST]),
        type=lambda value: [v.strip() for v in value.split(",") if v.strip()],
        help=f"comma-separated (of {', '.join(EAGER)})",
    )


def check_eager_variants(parser: argparse.ArgumentParser, variants: list[str]) -> None:
    unknown = [v for v in variants if v not in EAGER]
    if unknown:
        parser.error(f"--variants: unknown, compiled or graphed: {', '.join(unknown)}")


def twin(name: str) -> str:
    """The MoCo v2 row that DUPR row `name` is judged against: the one with its shared levers."""
    levers = VARIANTS[name].shared_levers()
    return next(
        other
        for other, variant in VARIANTS.items()
        if variant.method == BASELINE and variant.shared_levers() == levers
    )


def synthetic_batch(n: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """Random pixels, but crop records drawn like the real augmentation on a 500×375 photo."""
    from PIL import Image

    torch.manual_seed(seed)
    canvas = Image.new("RGB", (500, 375))
    geometric = CropAndFlip(size)
    crops = torch.stack(
        [torch.stack([geometric(canvas)[1], geometric(canvas)[1]]) for _ in range(n)]
    )
    views = torch.randn(2, n, 3, size, size)
    return {
        "view1": views[0].to(device),
        "view2": views[1].to(device),
        "crop1": crops[:, 0].to(device),
        "crop2": crops[:, 1].to(device),
    }


def build(
    method: str,
    args: argparse.Namespace,
    device: torch.device,
    model_overrides: dict | None = None,
    graph: bool = False,
    amp_dtype: str = "bfloat16",
) -> tuple[TrainState, OptimConfig]:
    """A training state of `method` (a preset) at the benchmark's sizes, autocast to `amp_dtype`,
    channels_last, with `model_overrides` (ModelConfig fields); `graph`: optim.cuda_graph."""
    cfg = preset(method)
    cfg.model.backbone, cfg.model.image_size, cfg.model.queue_size = (
        args.backbone,
        args.size,
        args.queue,
    )
    for name, value in (model_overrides or {}).items():
        setattr(cfg.model, name, value)
    cfg.optim = OptimConfig(
        lr=0.03,
        batch_size=args.batch,
        epochs=1,
        amp=True,
        amp_dtype=amp_dtype,
        channels_last=True,
        cuda_graph=graph,
    )
    validate(cfg)
    model = DUPR(cfg.model).to(device).to(memory_format=torch.channels_last)
    return build_state(model, cfg.optim, 10_000, device), cfg.optim


def build_variant(
    variant: Variant, args: argparse.Namespace, device: torch.device
) -> tuple[TrainState, OptimConfig]:
    """`build` with a row's levers: its model overrides, its graph, compiled as it says."""
    state, optim = build(
        variant.method, args, device, variant.model, variant.graph, variant.amp_dtype
    )
    if variant.compiled is not None:  # optim.compile's function
        compile_model(cast(DUPR, state.model), **variant.compiled)
        # As optim.compile: the colour steps of batches that bring them compile too (gpu_input).
        optim = dataclasses.replace(optim, compile=True)
    return state, optim


def count_flops(state, optim, batch, device) -> tuple[float, dict[str, float]]:
    """FLOPs of one training step (total, and per aten operator), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(state, batch, optim, device)
    per_op = {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return float(counter.get_total_flops()), per_op


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(state, optim, batch, device, steps: int) -> float:
    """Mean seconds per step over `steps` back-to-back steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        metrics = train_step(state, batch, optim, device)
    float(metrics["loss"])  # wait for the last step
    sync(device)
    return (time.perf_counter() - start) / steps


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 n×n×n matmul TFLOP/s on this card: the ceiling a real kernel reaches here."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def card_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK.items():  # "H100 PCIe" before "H100"
        if all(part in name for part in key.split()):
            return name, peak
    return name, None


def guarded(label: str, errors: dict[str, str], fn: Callable[[], object]) -> object | None:
    """Run fn; on an exception keep a one-line error for the variant's row and go on."""
    try:
        return fn()
    except Exception as err:  # a lever the card or the PyTorch release does not support
        errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        print(f"{label}: FAILED {errors[label]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=150.0,
        help="time budget: variants not ready by 60%% of it are skipped, rounds stop at it",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated rows to run (default all: {', '.join(VARIANTS)})",
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, batch 8, K=1024")
    parser.add_argument(
        "--flops-only", action="store_true", help="count FLOPs per image, no timing (any device)"
    )
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (valid: {', '.join(VARIANTS)})")
    for needed in (BASELINE, DEFAULT):
        if needed not in args.variants:
            args.variants.insert(0 if needed == BASELINE else 1, needed)
    for name in list(args.variants):  # each DUPR row's MoCo v2 twin, right after MoCo v2
        if VARIANTS[name].method == DEFAULT and twin(name) not in args.variants:
            args.variants.insert(1, twin(name))
    if args.quick:
        args.backbone, args.size, args.batch, args.queue = "resnet18", 64, 8, 1024
        args.warmup, args.steps, args.rounds = 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    batch = synthetic_batch(args.batch, args.size, device)

    # FLOPs of the two methods' default forms (what the method costs, whatever the kernel).
    flops: dict[str, float] = {}
    for method in (BASELINE, DEFAULT):
        state, optim = build(method, args, device)
        flops[method], per_op = count_flops(state, optim, batch, device)
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:4]
        print(
            f"{method}: {flops[method] / args.batch / 1e9:.1f} GFLOP per image ("
            + ", ".join(f"{op} {n / args.batch / 1e9:.1f}" for op, n in top)
            + ")",
            flush=True,
        )
        del state
    flop_ratio = flops[DEFAULT] / flops[BASELINE]
    if args.flops_only:
        rows = [
            [m, f"{flops[m] / args.batch / 1e9:.2f}", f"{flops[m] / flops[BASELINE]:.3f}"]
            for m in (BASELINE, DEFAULT)
        ]
        table = markdown_table(rows, ["method", "GFLOP per image", "FLOPs / MoCo v2"], pad=True)
        counted = (
            f"\n- {args.backbone}, {args.size} px, K={args.queue}, one training step of "
            f"{args.batch} images counted by torch.utils.flop_counter (forward + backward, "
            "convolutions and matmuls)\n"
        )
        print("\n" + table + counted)
        if args.record:
            record(args.record, "gpu_step (FLOP count)", machine, table + counted)
        return

    started = time.monotonic()
    errors: dict[str, str] = {}
    states: dict[str, tuple[TrainState, OptimConfig]] = {}
    peaks: dict[str, float] = {}
    warmup_s: dict[str, float] = {}
    for name in args.variants:  # build, warm up (cuDNN autotuning, compilation, bank filling)
        variant = VARIANTS[name]

        def prepare(name=name, variant=variant):
            # The variant's own peak: the states built before it stay allocated.
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            state, optim = build_variant(variant, args, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            time_steps(state, optim, batch, device, args.warmup)
            warmup_s[name] = time.perf_counter() - start
            if device.type == "cuda":
                peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
            states[name] = state, optim
            print(f"{name}: ready ({warmup_s[name]:.1f} s warm-up)", flush=True)

        if name != BASELINE and time.monotonic() - started > 0.6 * args.budget_s:
            errors[name] = f"skipped: past 60% of the {args.budget_s:g} s budget"
            continue
        guarded(name, errors, prepare)
    if BASELINE not in states:
        raise SystemExit(f"the baseline failed: {errors.get(BASELINE)}")

    step_times: dict[str, list[float]] = {name: [] for name in states}
    rounds = 0
    for r in range(args.rounds):
        if r > 0 and time.monotonic() - started > args.budget_s:
            break
        rounds += 1
        order = list(states) if r % 2 == 0 else list(reversed(states))
        for name in order:
            if name in errors:
                continue
            state, optim = states[name]

            def timed(state=state, optim=optim):
                return time_steps(state, optim, batch, device, args.steps)

            seconds = guarded(name, errors, timed)
            if seconds is not None:
                step_times[name].append(float(seconds))  # type: ignore[arg-type]

    card, peak = card_peak(device)
    measured_peak = matmul_tflops(device)
    on_target_card = device.type == "cuda" and ("H100" in card or "H200" in card)
    median = {n: statistics.median(t) for n, t in step_times.items() if t and n not in errors}
    if BASELINE not in median:
        raise SystemExit(f"the baseline failed while timed: {errors.get(BASELINE)}")
    rows, passing = [], []

    for name in args.variants:
        method = VARIANTS[name].method
        if name not in median:
            why = errors.get(name, "not run")
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", why])
            continue
        ips = args.batch / median[name]
        ratio = median[name] / median[BASELINE]
        tflops = flops[method] / median[name] / 1e12
        if name == BASELINE:
            verdict = "baseline"
        elif method == BASELINE:  # MoCo v2 with a lever: a baseline of its own, not a target
            verdict = "baseline lever"
        elif twin(name) not in median:  # parse_args adds it; it failed or was skipped
            verdict = f"no verdict: {twin(name)} not timed"
        else:
            # Judged against MoCo v2 with the same shared levers (compiled backbones, graph).
            fair = median[name] / median[twin(name)]
            ok = fair <= TARGET_RATIO and (ips >= TARGET_IMAGES_PER_S or not on_target_card)
            verdict = "PASS" if ok else "FAIL"
            if ok:
                passing.append(name)
        rows.append(
            [
                name,
                f"{median[name] * 1000:.1f}",
                f"{ips:.0f}",
                f"{ratio:.3f}",
                f"{peaks[name]:.1f}" if name in peaks else "-",
                f"{tflops:.1f}",
                f"{100 * tflops / peak:.1f}%" if peak else "-",
                f"{100 * tflops / measured_peak:.1f}%" if measured_peak else "-",
                verdict,
            ]
        )
    header = [
        "variant",
        "step ms (median)",
        "images/s",
        "step time / MoCo v2",
        "peak GiB",
        "model TFLOP/s",
        "of bf16 peak",
        "of bf16 matmul",
        "result",
    ]
    table = markdown_table(rows, header, pad=True)
    scope = "" if on_target_card else " (ratio only: not an H100/H200)"
    notes = [
        f"{args.backbone}, {args.size} px, per-GPU batch {args.batch}, K={args.queue}, S = "
        "14 (conv4) / 7 (conv5), bf16 autocast (float16 where the row says), channels_last; "
        "inputs already on the device",
        f"{rounds} rounds (of {args.rounds}) × {args.steps} steps after {args.warmup} warm-up steps per "
        "variant, variants alternating (order reversed every other round); warm-up s: "
        + ", ".join(f"{n} {s:.0f}" for n, s in warmup_s.items()),
        f"FLOPs (torch.utils.flop_counter, one step of the default form): MoCo v2 "
        f"{flops[BASELINE] / args.batch / 1e9:.1f}, DUPR {flops[DEFAULT] / args.batch / 1e9:.1f} "
        f"GFLOP per image, ratio {flop_ratio:.3f}; model TFLOP/s = these FLOPs / step time",
        f"card: {card}; dense bf16 peak {peak or '-'} TFLOP/s (data sheet); an 8192³ bf16 "
        f"matmul here: {f'{measured_peak:.0f}' if measured_peak else '-'} TFLOP/s",
        f"targets: images/s >= {TARGET_IMAGES_PER_S} on one H100 (H200 stated as such) and "
        f"step time / MoCo v2 <= {TARGET_RATIO}{scope}; met by: {', '.join(passing) or 'none'}",
    ]
    notes += [
        f"{name} / {twin(name)} (the same shared levers; the ratio its result is judged by): "
        f"{median[name] / median[twin(name)]:.3f}"
        for name in median
        if VARIANTS[name].method == DEFAULT and twin(name) != BASELINE and twin(name) in median
    ]
    if device.type != "cuda" and any(VARIANTS[name].graph for name in median):
        notes.append("CUDA graph rows: a CPU has no graphs; their static-input step ran eagerly")
    rows_with_levers = [v for v in args.variants if v not in (BASELINE, DEFAULT)]
    levers = ", ".join(v.removeprefix("dupr + ") for v in rows_with_levers) or "none"
    report(args, "gpu_step", device, machine, table, notes, f"; levers: {levers}")


if __name__ == "__main__":
    main()
