"""Where a training step's time goes on the GPU: torch.profiler over a few steps per variant.

    python benchmarks/gpu_profile.py --record benchmarks/RESULTS.md   # on a GPU, ~30 s
    python benchmarks/gpu_profile.py --quick --device cpu             # rehearsal of the script

Why: gpu_step.py gives each variant's step time; this says what fills it. For each variant (the
same `build` and synthetic batch as gpu_step.py) it warms up, profiles `--steps` back-to-back
training steps with CPU and CUDA activities, and reports per step: the wall time, the time the
GPU was busy (the device events: kernels and copies), the host-device synchronisations
(cudaStreamSynchronize / cudaDeviceSynchronize calls, and the aten ops that force one:
boolean-mask indexing, nonzero, item), and the operators with the most device time. Busy time well
below the wall time means the GPU waits for the host (launch overhead, synchronisations); busy
time near it means the kernels themselves are the cost. The profiler's own overhead lengthens
the host side: on an H200 a MoCo v2 step took 76 ms profiled against 27 ms in gpu_step.py, so
read the wall time as an upper bound and the device times as the kernels' cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_model_arguments, machine_lines, report, resolve_device  # noqa: E402
from gpu_step import (  # noqa: E402
    VARIANTS,
    add_eager_variants_argument,
    build_variant,
    check_eager_variants,
    sync,
    synthetic_batch,
    time_steps,
)

from dupr.io import markdown_table  # noqa: E402
from dupr.train import train_step  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
# The runtime calls that start a kernel: what benchmarks/step_operators.py counts on any machine.
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
# aten ops whose output size depends on the data, or that read a value: each waits for the GPU.
SYNCING_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select")


def device_time_us(event) -> float:
    """Self device time of a profiler average (named self_cuda_time_total before PyTorch 2.4)."""
    return float(
        getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
    )


def profile_variant(
    name: str, args, device: torch.device, batch: dict
) -> tuple[list, list[str], dict[str, tuple[float, float]]]:
    """(the top operators' rows, summary lines, every operator's (ms, calls) per step) of
    `args.steps` profiled steps of `name`."""
    variant = VARIANTS[name]
    if variant.compiled is not None or variant.graph:
        raise SystemExit(f"{name}: compiled and graphed variants are not profiled here")
    state, optim = build_variant(variant, args, device)
    time_steps(state, optim, batch, device, args.warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(state, batch, optim, device)
        sync(device)
        wall = (time.perf_counter() - start) / args.steps
    averages = prof.key_averages()
    on_gpu = device.type == "cuda"
    # The kernels (and copies) appear twice: as device events of their own, and as the self
    # device time of the operator that launched them. Busy time sums the former; the table
    # lists the operators.
    kernels = [e for e in averages if e.device_type != DeviceType.CPU]
    operators = [e for e in averages if e.device_type == DeviceType.CPU]

    def cost(event) -> float:  # µs per step
        return (device_time_us(event) if on_gpu else float(event.self_cpu_time_total)) / args.steps

    busy = sum(cost(e) for e in kernels) / 1e3 if on_gpu else None
    syncs = sum(e.count for e in operators if e.key in SYNC_CALLS) / args.steps
    launches = sum(e.count for e in operators if e.key in LAUNCH_CALLS) / args.steps
    forcing = {e.key: e.count / args.steps for e in operators if e.key in SYNCING_OPS}
    top = sorted(operators, key=cost, reverse=True)[: args.top]
    rows = [
        [
            name,
            e.key[:60],
            f"{cost(e) / 1e3:.2f}",
            f"{cost(e) / 1e3 / (wall * 1e3):.1%}",
            f"{e.count / args.steps:g}",
        ]
        for e in top
    ]
    summary = [
        f"{name}: {wall * 1e3:.1f} ms per step (profiled), GPU busy "
        + (f"{busy:.1f} ms ({busy / (wall * 1e3):.0%})" if busy is not None else "- (no GPU)")
        + (f"; {launches:g} kernel launches per step" if on_gpu else "")
        + f"; {syncs:g} host-device synchronisations per step; ops that force one, per step: "
        + (", ".join(f"{k} {v:g}" for k, v in sorted(forcing.items())) or "none")
    ]
    per_op = {e.key: (cost(e) / 1e3, e.count / args.steps) for e in operators if cost(e) > 0}
    del state, optim
    return rows, summary, per_op


def extra_rows(name: str, per_op: dict, baseline: dict, top: int) -> list[list[str]]:
    """The operators that take `name` more time than MoCo v2 per step, most first: where a
    DUPR step's extra time goes (MoCo v2's backbone work is in both)."""
    extra = {
        op: (ms - baseline.get(op, (0.0, 0.0))[0], calls - baseline.get(op, (0.0, 0.0))[1])
        for op, (ms, calls) in per_op.items()
    }
    ranked = sorted(extra.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    return [[name, op[:60], f"{ms:+.2f}", f"{calls:+g}"] for op, (ms, calls) in ranked if ms > 0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    parser.add_argument("--top", type=int, default=15, help="operators listed per variant")
    add_eager_variants_argument(parser)
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, batch 8, K=1024")
    parser.add_argument("--record", help="append the tables to this Markdown file")
    args = parser.parse_args(argv)
    check_eager_variants(parser, args.variants)
    if args.quick:
        args.backbone, args.size, args.batch, args.queue = "resnet18", 64, 8, 1024
        args.warmup, args.steps = 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    batch = synthetic_batch(args.batch, args.size, device)
    rows: list[list[str]] = []
    summaries: list[str] = []
    per_variant: dict[str, dict[str, tuple[float, float]]] = {}
    for name in args.variants:
        variant_rows, summary, per_variant[name] = profile_variant(name, args, device, batch)
        rows += variant_rows
        summaries += summary
        print(summary[0], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    what = "device" if device.type == "cuda" else "CPU (self)"
    header = ["variant", "operator", f"{what} ms per step", "of the step", "calls per step"]
    table = markdown_table(rows, header, pad=True)
    if "mocov2" in per_variant:
        extra = [
            row
            for name, per_op in per_variant.items()
            if name != "mocov2"
            for row in extra_rows(name, per_op, per_variant["mocov2"], args.top)
        ]
        header = ["variant", "operator", f"{what} ms per step over MoCo v2", "calls per step over"]
        table += "\n\nWhere the extra time goes: the operators that take each variant more time\n"
        table += "than MoCo v2's step, most first.\n\n" + markdown_table(extra, header, pad=True)
    notes = [
        f"{args.backbone}, {args.size} px, batch {args.batch}, K={args.queue}, bf16 autocast "
        f"(float16 where the variant says), channels_last; {args.steps} profiled steps after {args.warmup} warm-up steps",
        *summaries,
    ]
    report(args, "gpu_profile", device, machine, table, notes)


if __name__ == "__main__":
    main()
