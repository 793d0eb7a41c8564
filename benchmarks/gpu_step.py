"""DUPR vs MoCo v2 training-step throughput on one GPU (no Ray, no data loading).

    python benchmarks/gpu_step.py                       # ResNet-50, 224 px, batch 64, K=65536
    python benchmarks/gpu_step.py --record benchmarks/RESULTS.md
    python benchmarks/gpu_step.py --quick --device cpu  # smoke run of the script itself
    python benchmarks/gpu_step.py --flops-only --device cpu --batch 8  # FLOPs, any machine

Needs only torch and torchvision (the repository root is put on sys.path). Both methods run the
same `dupr.train.train_step` (SGD, bf16 autocast, channels_last) on batches already on the GPU,
so the numbers are the model's cost: backbone twice (query and momentum key encoder), heads,
RoIAlign, the losses against K-key memory banks, and the enqueue. Crop records come from real
RandomResizedCrop draws, so the patch loss sees the usual mix of overlap sizes. The two methods
alternate over rounds and the median step time of each is compared in the same run.

Each method's FLOPs per image are counted once (torch.utils.flop_counter on one step; convolution
and matmul FLOPs, forward and backward), so the table also gives the FLOP ratio, which bounds
what the step-time ratio can be where the GPU is compute-bound, and the achieved TFLOP/s. The
count needs no GPU: `--flops-only` prints it alone.

Targets (H100): DUPR >= 2,000 images/s per GPU and DUPR / MoCo v2 step time <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_lines, record, resolve_device  # noqa: E402

from dupr.config import OptimConfig, preset, validate  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.model import DUPR  # noqa: E402
from dupr.train import build_state, train_step  # noqa: E402
from dupr.views import CropAndFlip  # noqa: E402


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


def build(method: str, args: argparse.Namespace, device: torch.device):
    cfg = preset("dupr" if method == "dupr" else "mocov2")
    cfg.model.backbone, cfg.model.image_size, cfg.model.queue_size = (
        args.backbone,
        args.size,
        args.queue,
    )
    cfg.optim = OptimConfig(
        lr=0.03, batch_size=args.batch, epochs=1, amp=True, amp_dtype="bfloat16", channels_last=True
    )
    validate(cfg)
    model = DUPR(cfg.model).to(device).to(memory_format=torch.channels_last)
    return build_state(model, cfg.optim, 10_000, device), cfg.optim


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
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        metrics = train_step(state, batch, optim, device)
    float(metrics["loss"])  # wait for the last step
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch")
    parser.add_argument("--queue", type=int, default=65536, help="K, keys per memory bank")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, batch 8, K=1024")
    parser.add_argument(
        "--flops-only", action="store_true", help="count FLOPs per image, no timing (any device)"
    )
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.batch, args.queue = "resnet18", 64, 8, 1024
        args.warmup, args.steps, args.rounds = 2, 3, 2
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine))

    batch = synthetic_batch(args.batch, args.size, device)
    methods = ("mocov2", "dupr")
    states = {m: build(m, args, device) for m in methods}
    step_times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {}
    flops: dict[str, float] = {}
    for m in methods:  # warm-up (cuDNN autotuning, bank filling), peak memory, FLOPs
        state, optim = states[m]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        time_steps(state, optim, batch, device, 1 if args.flops_only else args.warmup)
        if device.type == "cuda":
            peaks[m] = torch.cuda.max_memory_allocated(device) / 2**30
        flops[m], per_op = count_flops(state, optim, batch, device)
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:4]
        print(
            f"{m}: {flops[m] / args.batch / 1e9:.1f} GFLOP per image ("
            + ", ".join(f"{op} {n / args.batch / 1e9:.1f}" for op, n in top)
            + ")",
            flush=True,
        )
    flop_ratio = flops["dupr"] / flops["mocov2"]
    if args.flops_only:
        rows = [
            [m, f"{flops[m] / args.batch / 1e9:.2f}", f"{flops[m] / flops['mocov2']:.3f}"]
            for m in methods
        ]
        table = markdown_table(rows, ["method", "GFLOP per image", "FLOPs / MoCo v2"], pad=True)
        notes = (
            f"\n- {args.backbone}, {args.size} px, K={args.queue}, one training step of "
            f"{args.batch} images counted by torch.utils.flop_counter (forward + backward, "
            "convolutions and matmuls)\n"
        )
        print("\n" + table + notes)
        if args.record:
            record(args.record, "gpu_step (FLOP count)", machine, table + notes)
        return
    for r in range(args.rounds):
        for m in methods if r % 2 == 0 else reversed(methods):
            state, optim = states[m]
            step_times[m].append(time_steps(state, optim, batch, device, args.steps))

    median = {m: statistics.median(t) for m, t in step_times.items()}
    ratio = median["dupr"] / median["mocov2"]
    on_h100 = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)
    rows = []
    for m in methods:
        ips = args.batch / median[m]
        if m == "dupr":
            target = ">= 2000 img/s on H100; ratio <= 1.15"
            ok = ratio <= 1.15 and (ips >= 2000 if on_h100 else True)
            verdict = ("PASS" if ok else "FAIL") + ("" if on_h100 else " (ratio only: not an H100)")
        else:
            target, verdict = "baseline", "baseline"
        rows.append(
            [
                m,
                f"{median[m] * 1000:.1f}",
                f"{ips:.0f}",
                f"{peaks[m]:.1f}" if m in peaks else "-",
                f"{ratio:.3f}" if m == "dupr" else "1.000",
                f"{flops[m] / args.batch / 1e9:.1f}",
                f"{flops[m] / median[m] / 1e12:.1f}",
                target,
                verdict,
            ]
        )
    header = [
        "method",
        "step ms (median)",
        "images/s",
        "peak GiB",
        "step time / MoCo v2",
        "GFLOP/image",
        "TFLOP/s",
        "target",
        "result",
    ]
    table = markdown_table(rows, header, pad=True)
    notes = (
        f"\n- {args.backbone}, {args.size} px, per-GPU batch {args.batch}, K={args.queue}, bf16 autocast, "
        f"channels_last; {args.rounds} rounds × {args.steps} steps after {args.warmup} warm-up steps; "
        "inputs already on the device (no data loading)\n"
        f"- FLOPs (torch.utils.flop_counter, one step): DUPR / MoCo v2 = {flop_ratio:.3f}\n"
    )
    print("\n" + table + notes)
    if args.record:
        record(
            args.record,
            f"gpu_step ({'quick' if args.quick else 'default'}, {device})",
            machine,
            table + notes,
        )


if __name__ == "__main__":
    main()
