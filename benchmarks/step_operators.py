"""Operators a training step dispatches, MoCo v2 against DUPR, by the part of the method that
issues them: what the host must launch every step, on any machine.

    python benchmarks/step_operators.py --record benchmarks/RESULTS.md   # ~3 min on 2 cores
    python benchmarks/step_operators.py --quick                          # batch 8, K=4096

Why: on an H200 at a per-GPU batch of 64 the step is bound by the host's kernel launches, not by
the GPU (MoCo v2 took 27-34 ms for 23.4 ms of GPU work, DUPR with its best eager levers 52.7 ms
for 33.6 ms; benchmarks/RESULTS.md), and every small operator also costs the GPU a few
microseconds however little it computes. So the number of operators DUPR adds to MoCo v2's step
bounds how close its eager step can come to MoCo v2's. Unlike a step time it does not depend
on the machine, so it can be measured and improved without a GPU.

What is counted: every aten operator of one `dupr.train.train_step` (after one warm-up step)
that runs a kernel, i.e. not views and not detach; through a `TorchDispatchMode`, so after
autocast (on a GPU its casts are counted; on a CPU the step runs without autocast). Each
operator is charged to the innermost frame of `dupr/` that issued it; backward operators to
the frame that created their autograd node (anomaly mode records it). The SGD update is listed
apart and left out of the totals: on a GPU it is a fused kernel per group of tensors, on a CPU
a loop over the tensors. Sizes: ResNet-50 (the operators do not depend on the image size, so
64 px keeps the CPU's work small), per-GPU batch 64 and K = 65536 as in the paper (the chunked
patch loss's number of chunks depends on them).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import add_model_arguments, machine_lines, report, resolve_device  # noqa: E402
from gpu_step import (  # noqa: E402
    BASELINE,
    VARIANTS,
    add_eager_variants_argument,
    build_variant,
    check_eager_variants,
    synthetic_batch,
)

from dupr.io import markdown_table  # noqa: E402
from dupr.train import train_step  # noqa: E402

# Operators that launch no kernel (besides views): metadata, or a scalar kept on the host.
NO_KERNEL = {"aten.detach.default", "aten.promote_types.default", "aten.scalar_tensor.default"}
NO_KERNEL |= {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default"}
NO_KERNEL |= {"aten.lift_fresh.default", "aten._unsafe_view.default"}
BANKS, HEADS, LOSSES = (
    "memory banks (snapshot, sampling, enqueue)",
    "heads (MLPs, L2 normalisation, grid mirroring)",
    "InfoNCE losses (Eq. 7-8)",
)
# (file, function) of the innermost dupr/ frame → the part of the method; the file alone else.
PARTS = {
    ("geometry.py", "unflip_grid"): HEADS,
    ("model.py", "patch_loss"): LOSSES,
    ("model.py", "enqueue"): BANKS,
    ("model.py", "sample_patch_keys"): BANKS,
    ("model.py", "bank_snapshot"): BANKS,
    ("model.py", "momentum_update"): "momentum update",
    ("backbone.py", None): "backbone",
    ("heads.py", None): HEADS,
    ("roi_align.py", None): "RoIAlign (weights and pooling)",
    ("geometry.py", None): "view boxes and validity (Eq. 3-4)",
    ("losses.py", None): LOSSES,
    ("memory_bank.py", None): BANKS,
    ("model.py", None): "loss sums and metrics",
    ("train.py", None): "batch and learning rate",
}
SGD = "SGD update (left out of the totals)"
FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+, in (?P<function>\S+)')


def part_of(frames: list[tuple[str, str]]) -> str:
    """The part of the method that the innermost frame in dupr/ belongs to."""
    for path, function in reversed(frames):
        if "/torch/optim/" in path:
            return SGD
        if "/dupr/" in path:
            name = Path(path).name
            return PARTS.get((name, function)) or PARTS.get((name, None), name)
    return "elsewhere"


class OperatorCount(TorchDispatchMode):
    """Counts kernel-launching operators per (part, forward or backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in NO_KERNEL:
            node = torch._C._current_autograd_node()
            if node is None:
                frames = [(f.filename, f.name) for f in traceback.extract_stack()[:-1]]
                self.counts[part_of(frames), "forward"] += 1
            else:  # the frame that created the node, recorded by anomaly mode
                metadata = getattr(node, "metadata", {})  # a dict (typed as a method)
                created = "".join(metadata.get("traceback_", []))
                frames = [(m["file"], m["function"]) for m in FRAME.finditer(created)]
                self.counts[part_of(frames), "backward"] += 1
        return func(*args, **(kwargs or {}))


def count_step(name: str, args: argparse.Namespace, device: torch.device, batch: dict) -> Counter:
    """Operators of one training step of variant `name`, after a warm-up step."""
    state, optim = build_variant(VARIANTS[name], args, device)
    train_step(state, batch, optim, device)  # SGD's momentum buffers, lazy initialisation
    counter = OperatorCount()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
        metrics = train_step(state, batch, optim, device)
    float(metrics["loss"])
    return counter.counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.set_defaults(device="cpu", size=64)
    add_eager_variants_argument(parser)
    parser.add_argument("--quick", action="store_true", help="batch 8, K=4096")
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    check_eager_variants(parser, args.variants)
    if BASELINE not in args.variants:
        args.variants.insert(0, BASELINE)
    if args.quick:
        args.batch, args.queue = 8, 4096
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    batch = synthetic_batch(args.batch, args.size, device)
    counts = {}
    for name in args.variants:
        counts[name] = count_step(name, args, device, batch)
        total = sum(n for (part, _), n in counts[name].items() if part != SGD)
        print(f"{name}: {total} operators per step (without the SGD update)", flush=True)

    def cell(name: str, parts: list[str]) -> str:
        fwd = sum(counts[name][p, "forward"] for p in parts)
        bwd = sum(counts[name][p, "backward"] for p in parts)
        return f"{fwd} + {bwd}" if fwd or bwd else "-"

    seen = {part for c in counts.values() for part, _ in c}
    order = list(dict.fromkeys([*PARTS.values(), "elsewhere", SGD]))
    parts = [p for p in order if p in seen] + sorted(seen - set(order))
    counted = [p for p in parts if p != SGD]
    rows = [[part, *(cell(n, [part]) for n in args.variants)] for part in parts]
    totals = {n: sum(v for (p, _), v in counts[n].items() if p != SGD) for n in args.variants}
    rows.append(["total (forward + backward)", *(cell(n, counted) for n in args.variants)])
    rows.append(["total", *(str(totals[n]) for n in args.variants)])
    rows.append(["over MoCo v2", *(f"{totals[n] / totals[BASELINE]:.2f}×" for n in args.variants)])
    table = markdown_table(rows, ["part of the step", *args.variants], pad=True)
    notes = [
        f"{args.backbone}, {args.size} px, batch {args.batch}, K={args.queue}; one step after "
        "a warm-up step; forward + backward operators that run a kernel (views, detach and "
        "host scalars left out), charged to the part of dupr/ that issued them",
        "on a GPU: autocast's casts come on top, and the SGD update is a fused kernel per "
        "group of tensors"
        + (" (counted here with autocast, on the GPU)" if device.type == "cuda" else ""),
    ]
    report(args, "step_operators", device, machine, table, notes)


if __name__ == "__main__":
    main()
