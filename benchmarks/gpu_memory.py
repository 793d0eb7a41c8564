"""GPU memory of a training step at the paper's setting: peak at batch 32 and 64, largest batch.

    python benchmarks/gpu_memory.py --record benchmarks/RESULTS.md   # on a GPU, ~1-2 min
    python benchmarks/gpu_memory.py --quick --device cpu             # rehearsal of the script

Why: the per-GPU batch a card holds decides how many GPUs a run of the paper's global batch
needs and whether a larger per-GPU batch could raise throughput. What runs: the training step
of `gpu_step.py` (ResNet-50, 224 px, K = 65536, S = 14/7, bf16 autocast, channels_last) on
synthetic batches already on the GPU, for DUPR as configured by default, DUPR with the
attention kernel (it never stores the patch logits) and MoCo v2 for reference.

- peak at batch 32 (the paper's 256 images over 8 GPUs) and 64: `max_memory_allocated` over
  three steps, all of the process's tensors included (weights, optimizer state, memory banks);
- largest batch: on a GPU the first probe is 90 % of the batch at which the peaks' straight
  line reaches the card's memory; then batch sizes double until a step runs out of memory, and
  a bisection narrows the limit to 1/16 of it; each probe is two steps. cuDNN's autotuner stays on as in
  training (a probe's autotuning skips algorithms whose workspace does not fit). `--max-batch`
  caps the search, `--budget-s` its time (the limit found so far is then reported as a bound).

On a CPU (the rehearsal) there is no allocator peak: the search runs only to `--max-batch`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_model_arguments, machine_lines, report, resolve_device  # noqa: E402
from gpu_step import build, synthetic_batch, time_steps  # noqa: E402

from dupr.io import markdown_table  # noqa: E402

# name -> (preset, model overrides)
METHODS = {
    "dupr": ("dupr", {}),
    "dupr + attention kernel": ("dupr", {"patch_loss_kernel": "attention"}),
    "mocov2": ("mocov2", {}),
}


def peak_gib(state, optim, batch_size: int, args, device) -> float | None:
    """Peak allocated GiB over three steps at this batch size (None on a CPU)."""
    batch = synthetic_batch(batch_size, args.size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_steps(state, optim, batch, device, 3)
    del batch
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def fits(state, optim, batch_size: int, args, device) -> bool:
    """Whether two training steps at this batch size run without running out of memory."""
    batch: dict | None = None
    try:
        batch = synthetic_batch(batch_size, args.size, device)
        time_steps(state, optim, batch, device, 2)
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as err:  # cuDNN and cuBLAS report running out as their own errors
        if "out of memory" in str(err).lower() or "NOT_ENOUGH" in str(err):
            return False
        raise
    finally:
        batch = None
        state.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def linear_estimate(
    batches: list[int], peaks: list[float | None], total: float | None
) -> int | None:
    """The batch at which the peak, extrapolated linearly from the measured ones, fills the card.

    Activations grow with the batch and everything else (weights, optimizer state, banks)
    does not, so two peaks give the line. Probing from there, not by doubling from 64, keeps
    the search to a few probes on a large card (each probe at thousands of images costs seconds
    of steps and cuDNN autotuning for the new shapes).
    """
    measured = sorted((b, p) for b, p in zip(batches, peaks, strict=True) if p is not None)
    if total is None or len(measured) < 2:
        return None
    (b0, p0), (b1, p1) = measured[-2:]
    slope = (p1 - p0) / (b1 - b0)
    return int((total - p1) / slope) + b1 if slope > 0 else None


def largest_batch(
    state, optim, args, device, start: int, estimate: int | None = None
) -> tuple[int, int | None, int, str]:
    """(largest batch that fit, smallest that did not or None, probes, how the search ended).

    With an `estimate`, the first probe is 90 % of it; then doubling (while everything fits)
    and bisection to 1/16 of the limit, as without one."""
    deadline = time.monotonic() + args.budget_s
    good, bad, probes = start, None, 0
    while bad is None or bad - good > max(1, good // 16):
        if time.monotonic() > deadline:
            return good, bad, probes, f"time budget of {args.budget_s} s"
        if probes == 0 and estimate and estimate * 9 // 10 > start:
            size = estimate * 9 // 10
        else:
            size = good * 2 if bad is None else (good + bad) // 2
        if size > args.max_batch:
            if bad is None and good < args.max_batch:
                size = args.max_batch
            else:
                return good, bad, probes, f"--max-batch {args.max_batch}"
        probes += 1
        ok = fits(state, optim, size, args, device)
        print(f"  batch {size}: {'fits' if ok else 'out of memory'}", flush=True)
        if ok:
            good = size
        else:
            bad = size
    return good, bad, probes, "bisection"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, batch=False)
    parser.add_argument("--batches", default="32,64", help="batch sizes whose peak is reported")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=60.0, help="per method's search")
    parser.add_argument("--methods", default=",".join(METHODS), help="peaks of these")
    parser.add_argument(
        "--search", default="dupr,dupr + attention kernel", help="largest batch of these"
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, K=1024")
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.search = [m.strip() for m in args.search.split(",") if m.strip()]
    unknown = [m for m in args.methods + args.search if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (valid: {', '.join(METHODS)})")
    if args.quick:
        args.backbone, args.size, args.queue = "resnet18", 64, 1024
        args.batches, args.max_batch = [8, 16], 32
    args.batch = max(args.batches)  # what gpu_step.build sizes the optimizer config for
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    total = (
        torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else None
    )
    rows = []
    for name in args.methods:
        method, overrides = METHODS[name]
        state, optim = build(method, args, device, overrides)
        peaks = [peak_gib(state, optim, b, args, device) for b in args.batches]
        shown = ", ".join(f"{p:.1f} GiB" if p is not None else "-" for p in peaks)
        print(f"{name}: peaks at {args.batches}: {shown}", flush=True)
        searched = ["-", "-", "not searched"]
        if name in args.search:
            start = time.perf_counter()
            estimate = linear_estimate(args.batches, peaks, total)
            good, bad, probes, ended = largest_batch(
                state, optim, args, device, max(args.batches), estimate
            )
            if estimate:
                ended += f"; linear estimate from the peaks {estimate}"
            searched = [
                f"{good}" if bad is not None else f">= {good}",
                str(bad) if bad is not None else "-",
                f"{probes} probes, {time.perf_counter() - start:.0f} s, ended by {ended}",
            ]
        rows.append([name, *(f"{p:.1f}" if p is not None else "-" for p in peaks), *searched])
        del state, optim
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = [
        "method",
        *(f"peak GiB at batch {b}" for b in args.batches),
        "largest batch that fits",
        "smallest that did not",
        "search",
    ]
    table = markdown_table(rows, header, pad=True)
    notes = [
        f"{args.backbone}, {args.size} px, K={args.queue}, S = 14 (conv4) / 7 (conv5), bf16 "
        "autocast (on a GPU), channels_last; synthetic batches on the device; peaks are "
        "torch.cuda.max_memory_allocated over 3 steps (weights, optimizer state, banks included)",
        f"card memory: {f'{total:.0f} GiB' if total else '-'}; a probe = 2 steps; first probe "
        "at 90 % of the peaks' linear estimate, bisection to 1/16 of the limit",
    ]
    report(args, "gpu_memory", device, machine, table, notes)


if __name__ == "__main__":
    main()
