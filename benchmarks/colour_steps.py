"""The colour steps on the training device, eager against compiled (`optim.compile`).

Why: with ``augment.photometric_on=device`` the loader ships uint8 crops and the training
process runs the colour steps (`dupr.photometric.apply_photometric`) before each step. Eager,
each operation is a few dozen tensor operators over the images that drew it: passes over the
batch's memory and, on a GPU, one kernel launch each (run 4 on an H200: 14 ms of a step of 64,
benchmarks/RESULTS.md). Compiled, each operation's gather, arithmetic and scatter fuse into a few
kernels (`dupr.photometric._compiled_step`). The baseline is the eager form, in the same run.

What runs: `--batches` batches of `--views` 224 px views (both views of `--views`/2 pairs, as
`dupr.train.to_device` passes them), cut by `dupr.views.TwoViews` from the bundled photographs
with their colour choices drawn as the loader draws them, for the `dupr` preset (RandAugment
first) and `mocov2`. Each round runs every batch once per form, the forms alternating (order
reversed every other round); the table gives the median and quartiles over rounds of the time
per batch and of the per-round ratio to eager, the compiled form's first pass (its compiling),
and on a GPU the kernel launches and GPU time of one batch (profiled). Target: compiled <= 1.0x
eager.

    python benchmarks/colour_steps.py             # ~2 minutes on 2 cores, most of it compiling
    python benchmarks/colour_steps.py --quick     # smoke run
    python benchmarks/colour_steps.py --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import fill_sizes, machine_lines, quartiles, report, resolve_device  # noqa: E402
from gpu_profile import LAUNCH_CALLS, device_time_us  # noqa: E402

from dupr.config import AugmentConfig  # noqa: E402
from dupr.data.bundled import bundled_photos  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.photometric import apply_photometric  # noqa: E402
from dupr.views import TwoViews  # noqa: E402

DEFAULTS = {"views": 128, "size": 224, "batches": 4, "rounds": 5}
QUICK = {"views": 16, "size": 64, "batches": 2, "rounds": 2}
PRESETS = {"dupr": "mocov2_randaugment", "mocov2": "mocov2"}  # name -> augment.preset
FORMS = ("eager", "compiled")
TARGET_RATIO = 1.0  # compiled / eager time per batch


def make_batches(
    preset: str, args, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 views on the device, their choice rows on the host) per batch, as `to_device`
    gets them: the first views of every pair, then the second."""
    photos = [image for _, image in bundled_photos()]
    views = TwoViews(args.size, AugmentConfig(preset=preset, photometric_on="device"))
    torch.manual_seed(args.seed)
    batches = []
    for b in range(args.batches):
        pairs = [views(photos[(b * args.views + i) % len(photos)]) for i in range(args.views // 2)]
        crops = torch.stack([p[f"view{v}"] for v in "12" for p in pairs])
        rows = torch.stack([p[f"photometric{v}"] for v in "12" for p in pairs])
        batches.append((crops.to(device), rows))
    return batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_pass(batches, compiled: bool, device: torch.device) -> float:
    """Seconds per batch over one pass of `batches`."""
    sync(device)
    start = time.perf_counter()
    for views, rows in batches:
        apply_photometric(views, rows, compiled)
    sync(device)
    return (time.perf_counter() - start) / len(batches)


def gpu_kernels(views, rows, compiled: bool) -> tuple[int, float]:
    """(kernel launches by the host, GPU milliseconds) for one batch, from PyTorch's profiler,
    counted as benchmarks/gpu_profile.py counts a step's."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        apply_photometric(views, rows, compiled)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    launches = sum(e.count for e in averages if e.key in LAUNCH_CALLS)
    busy = sum(device_time_us(e) for e in averages if e.device_type != DeviceType.CPU)
    return launches, busy / 1e3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    for name in ("views", "size", "batches", "rounds"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", metavar="RESULTS_MD")
    args = parser.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    if args.views < 2 or args.views % 2:
        parser.error(f"--views {args.views}: an even number, both views of each pair")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    rows, notes, verdicts = [], [], []
    for name, preset in PRESETS.items():
        batches = make_batches(preset, args, device)
        first = {form: one_pass(batches, form == "compiled", device) for form in FORMS}
        eager = torch.cat([apply_photometric(v, r) for v, r in batches])
        compiled = torch.cat([apply_photometric(v, r, True) for v, r in batches])
        difference = (eager - compiled).abs().max().item()
        seconds: dict[str, list[float]] = {form: [] for form in FORMS}
        for r in range(args.rounds):
            for form in FORMS if r % 2 == 0 else reversed(FORMS):
                seconds[form].append(one_pass(batches, form == "compiled", device))
            print(
                f"{name} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{form} {seconds[form][-1] * 1e3:.1f} ms" for form in FORMS),
                flush=True,
            )
        for form in FORMS:
            low, median, high = quartiles(seconds[form])
            ratio, result = "-", "baseline"
            if form == "compiled":
                ratios = [c / e for c, e in zip(seconds[form], seconds["eager"], strict=True)]
                r_low, r_med, r_high = quartiles(ratios)
                ratio = f"{r_med:.3f} ({r_low:.3f}-{r_high:.3f})"
                result = "PASS" if r_med <= TARGET_RATIO else "FAIL"
                verdicts.append(result)
            kernels = "-"
            if device.type == "cuda":
                count, gpu_ms = gpu_kernels(*batches[0], form == "compiled")
                kernels = f"{count} ({gpu_ms:.2f} ms)"
            rows.append(
                [
                    name,
                    form,
                    f"{median * 1e3:.1f}",
                    f"{low * 1e3:.1f}-{high * 1e3:.1f}",
                    f"{args.views / median:.0f}",
                    ratio,
                    f"{first[form]:.1f}",
                    kernels,
                    result,
                ]
            )
        notes.append(
            f"{name}: compiled against eager, largest difference {difference:.1e} in the "
            "normalised views (the same arithmetic, summed in another order)"
        )
    header = [
        "preset",
        "form",
        "ms per batch (median)",
        "p25-p75",
        "views/s",
        "compiled / eager (p25-p75)",
        "first pass s",
        "kernel launches (GPU ms) per batch",
        "result",
    ]
    overall = "PASS" if verdicts and all(v == "PASS" for v in verdicts) else "FAIL"
    notes = [
        f"{args.batches} batches of {args.views} views ({args.size} px) cut from the bundled "
        "photographs, colour choices drawn as the loader draws them; views on the device, "
        "choices on the host",
        f"{args.rounds} rounds, each one pass over the batches per form, forms alternating "
        "(order reversed every other round); first pass s: the first pass, compiling included",
        *notes,
        f"target: compiled <= {TARGET_RATIO}x eager per batch; overall: **{overall}**",
    ]
    table = markdown_table(rows, header, pad=True)
    report(args, "colour_steps", device, machine, table, notes)
    print(f"overall: {overall}")


if __name__ == "__main__":
    main()
