"""A loader process's work per sample, from the JPEG file to both views: PIL or TorchCodec decoding.

Why: on a GPU node the loader's CPU cores decide whether the GPU waits for data (issue 14, part
5), and with the colour steps on the device most of a sample's work is decoding. The pre-training
loader decodes with `dupr.data.folder.load_pixels` (TorchCodec's `decode_jpeg` for RGB and gray
JPEGs, straight into a tensor); the baseline is `load_rgb` (PIL, then the tensor the views are
cut from), which gives the same pixels. Both then cut the same two views (`dupr.views.TwoViews`,
same seeds, same crops).

What runs: `--images` ImageNet-like JPEGs (~95 KB, 333-500 px, built offline from the bundled
photos, as `gpu_input.py` builds them), page cache warm; one process, one torch thread, like a
loader worker. Each round is one pass in which the variants alternate every `--block` images in
an order shuffled per block, each seeded alike; the table gives the median and quartiles of
samples/s over rounds and of the per-round ratio to the PIL baseline of the same colour
placement. Target: TorchCodec >= 1.0x PIL with the colour steps on the device.

    python benchmarks/decode_throughput.py             # ~1 minute on 2 cores
    python benchmarks/decode_throughput.py --quick     # smoke run
    python benchmarks/decode_throughput.py --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import build_folder, fill_sizes, machine_lines, quartiles, record  # noqa: E402

from dupr.config import AugmentConfig  # noqa: E402
from dupr.data.folder import decode_jpeg, list_image_files, load_pixels, load_rgb  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.views import TwoViews  # noqa: E402

DEFAULTS = {"images": 256, "rounds": 7}
QUICK = {"images": 32, "rounds": 2}
PLACEMENTS = ("device", "loader")  # augment.photometric_on
DECODERS: dict[str, Callable[[Path], Image.Image | torch.Tensor]] = {
    "PIL (load_rgb)": load_rgb,
    "TorchCodec (load_pixels)": load_pixels,
}
BASELINE = "PIL (load_rgb)"


def run_round(files: list[Path], seed: int, block: int) -> dict[tuple[str, str], float]:
    """Samples per second of each (colour placement, decoder) over one pass of `files`."""
    variants = {
        (placement, name): (TwoViews(224, AugmentConfig(photometric_on=placement)), decode)
        for placement in PLACEMENTS
        for name, decode in DECODERS.items()
    }
    seconds = dict.fromkeys(variants, 0.0)
    order = random.Random(seed)
    gc.disable()
    try:
        for start in range(0, len(files), block):
            keys = list(variants)
            order.shuffle(keys)
            for key in keys:
                views, decode = variants[key]
                torch.manual_seed(seed + start)  # the same crops and choices for every variant
                t0 = time.perf_counter()
                for path in files[start : start + block]:
                    views(decode(path))
                seconds[key] += time.perf_counter() - t0
    finally:
        gc.enable()
    return {key: len(files) / s for key, s in seconds.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", metavar="RESULTS_MD")
    args = parser.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if decode_jpeg is None:
        sys.exit("decode_throughput: TorchCodec is not importable here; nothing to compare")
    torch.set_num_threads(1)
    machine = machine_lines("cpu")
    print("\n".join(machine))
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dupr-bench-") as tmp:
        size = build_folder(Path(tmp), args.images, args.seed)
        files = list_image_files(tmp)
        run_round(files[: args.block], args.seed, args.block)  # warm-up: caches, first calls
        for r in range(args.rounds):
            for key, rate in run_round(files, args.seed + r, args.block).items():
                rates.setdefault(key, []).append(rate)
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{p}/{d.split()[0]} {v[-1]:.0f}/s" for (p, d), v in rates.items()),
                flush=True,
            )

    rows, verdicts = [], []
    for placement, name in rates:
        low, median, high = quartiles(rates[(placement, name)])
        ratio = "-"
        result = "baseline" if name == BASELINE else "info"
        if name != BASELINE:
            ours, base = rates[(placement, name)], rates[(placement, BASELINE)]
            ratios = [a / b for a, b in zip(ours, base, strict=True)]
            r_low, r_med, r_high = quartiles(ratios)
            ratio = f"{r_med:.3f} ({r_low:.3f}-{r_high:.3f})"
            if placement == "device":
                result = "PASS" if r_med >= 1.0 else "FAIL"
                verdicts.append(result)
        rows.append(
            [
                placement,
                name,
                f"{median:.1f}",
                f"{low:.1f}-{high:.1f}",
                f"{1e3 / median:.2f}",
                ratio,
                ">= 1.0x PIL" if placement == "device" and name != BASELINE else "-",
                result,
            ]
        )
    header = [
        "colour steps",
        "decoder",
        "samples/s median",
        "samples/s p25-p75",
        "ms per sample",
        "ratio to PIL median (p25-p75)",
        "target",
        "result",
    ]
    notes = [
        f"{len(files)} ImageNet-like JPEGs ({size / len(files) / 1024:.0f} KB average), page "
        "cache warm; a sample = read + decode + both 224 px views (`TwoViews`), one process, "
        "one torch thread",
        f"{args.rounds} rounds; within a round the variants alternate every {args.block} "
        "images (order shuffled per block), each seeded alike, so all draw the same crops",
        "colour steps on the device: the loader's part (uint8 crops and the drawn choices); "
        "in the loader: PIL's colour steps too (info)",
    ]
    body = markdown_table(rows, header, pad=True) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    overall = "PASS" if verdicts and all(v == "PASS" for v in verdicts) else "FAIL"
    print("\n" + body + f"\n\noverall: {overall}")
    if args.record:
        title = f"decode_throughput ({'quick' if args.quick else 'default'}, cpu)"
        record(args.record, title, machine, body + f"\n\noverall: **{overall}**\n")


if __name__ == "__main__":
    main()
