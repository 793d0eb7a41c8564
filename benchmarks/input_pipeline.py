"""Input pipeline throughput: two-view images/s from Parquet shards vs from the image folder.

Why: on a cluster the images come from Parquet shards in object storage
(`dupr_platform.shards`), which adds a row-group read and an in-memory decode to each sample.
That must not slow the data path: target Parquet >= 0.9x the local-folder path, per loader
configuration, on the same images.

What runs: the bundled image folder (`--images`, 512 JPEGs of 128-256 px) and the same files
packed by `prepare_shards` into local shards; both go through
`dupr.data.two_views.build_loader(images, TwoViews(224), batch_size=32, num_workers=N)` for each N
in `--workers` (0, 1, 2), persistent workers, one torch thread in the main process. Variants:

  folder          ImageFolderDataset (the baseline)
  parquet         ParquetImageDataset with its default cache (8 row groups per process)
  parquet, cache1 ParquetImageDataset with a 1-row-group cache (info): under the shuffled sampler
                  nearly every sample reads a whole row group, the worst case for a large set

After one warm-up epoch per variant (worker start-up, page cache), each round runs one epoch of
every variant in a shuffled order, all with the same sampler epoch, so every variant draws the
very same crops and colour changes: the work differs only in how the bytes are fetched. Reported:
median and quartiles of images/s over rounds, images/s per CPU core (divided by max(N, 1); with
workers the main process also spends some time collating), and the per-round ratio to the
folder path.

    python benchmarks/input_pipeline.py             # ~3 minutes on 2 cores
    python benchmarks/input_pipeline.py --quick     # ~20-30 s smoke run
    python benchmarks/input_pipeline.py --record benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch
from _common import fill_sizes, machine_lines, quartiles, record, resolve_device

from dupr.data import ImageFolderDataset, build_bundled_image_folder
from dupr.data.two_views import EpochSampler, build_loader
from dupr.io import markdown_table
from dupr.views import TwoViews
from dupr_platform.shards import ParquetImageDataset, prepare_shards

TARGET_RATIO = 0.9  # Parquet / folder images per second
DEFAULTS = {"images": 512, "epochs": 4}
QUICK = {"images": 64, "epochs": 2}

FOLDER, PARQUET, PARQUET_1 = "folder", "parquet", "parquet, cache1"


def epoch_rate(loader: torch.utils.data.DataLoader, epoch: int, device: torch.device) -> float:
    """Images per second of one full epoch, from creating the iterator to the last batch."""
    cast(EpochSampler, loader.sampler).set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        view = batch["view1"]
        if device.type == "cuda":
            view = view.to(device, non_blocking=True)
        images += view.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def fmt_spread(values: list[float], digits: int) -> tuple[str, str]:
    q1, q2, q3 = quartiles(values)
    return f"{q2:.{digits}f}", f"{q1:.{digits}f}-{q3:.{digits}f}"


def verdict(ratios: list[float]) -> str:
    """PASS on the median; PASS (within noise) when only the upper quartile reaches the target."""
    _, median, upper = quartiles(ratios)
    if median >= TARGET_RATIO:
        return "PASS"
    return "PASS (within noise)" if upper >= TARGET_RATIO else "FAIL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, help="images in the bundled set (512)")
    p.add_argument("--epochs", type=int, help="timed rounds, one epoch of each variant each (4)")
    p.add_argument("--workers", default="0,1,2", help="DataLoader num_workers values")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=224, help="view size")
    p.add_argument("--images-per-shard", type=int, default=128)
    p.add_argument("--row-group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where batches go: cpu, cuda or auto")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 2 rounds")
    p.add_argument("--record", metavar="FILE", help="append the table to this Markdown file")
    args = p.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    args.workers = [int(n) for n in args.workers.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print("\n".join(machine), flush=True)

    with tempfile.TemporaryDirectory(prefix="dupr-input-bench-") as tmp:
        folder = build_bundled_image_folder(Path(tmp) / "folder", num_images=args.images)
        start = time.perf_counter()
        index = prepare_shards(
            str(folder),
            str(Path(tmp) / "shards"),
            images_per_shard=args.images_per_shard,
            row_group_size=args.row_group_size,
        )
        prepare_s = time.perf_counter() - start
        print(f"prepare_shards: {prepare_s:.2f} s\n{index.summary()}", flush=True)
        shard_dir = str(Path(tmp) / "shards")
        datasets: dict[str, Any] = {
            FOLDER: ImageFolderDataset(folder),
            PARQUET: ParquetImageDataset(shard_dir),
            PARQUET_1: ParquetImageDataset(shard_dir, cache_row_groups=1),
        }
        transform = TwoViews(args.size)
        rng = random.Random(args.seed)
        rates: dict[tuple[int, str], list[float]] = {}
        for workers in args.workers:
            loaders = {
                name: build_loader(
                    ds,
                    transform,
                    args.batch_size,
                    seed=args.seed,
                    num_workers=workers,
                    pin_memory=device.type == "cuda",
                )
                for name, ds in datasets.items()
            }
            for loader in loaders.values():
                epoch_rate(loader, 0, device)  # warm-up: worker start-up, page cache
            for r in range(args.epochs):
                order = list(loaders)
                rng.shuffle(order)
                for name in order:
                    rate = epoch_rate(loaders[name], r + 1, device)
                    rates.setdefault((workers, name), []).append(rate)
                line = " ".join(f"{n}={rates[(workers, n)][-1]:.1f}" for n in loaders)
                print(f"workers={workers} round {r + 1}/{args.epochs} images/s: {line}", flush=True)
            del loaders, loader
            gc.collect()  # shuts the persistent workers down before the next configuration

    rows = []
    verdicts = []
    for workers in args.workers:
        cores = max(workers, 1)
        base = rates[(workers, FOLDER)]
        for name in (FOLDER, PARQUET, PARQUET_1):
            values = rates[(workers, name)]
            median, spread = fmt_spread(values, 1)
            per_core = f"{statistics.median(values) / cores:.1f}"
            if name == FOLDER:
                rows.append([workers, name, median, spread, per_core, "-", "baseline", "baseline"])
                continue
            ratios = [a / b for a, b in zip(values, base, strict=True)]
            r_med, r_spread = fmt_spread(ratios, 3)
            if name == PARQUET:
                target, result = f">= {TARGET_RATIO:.1f}x folder", verdict(ratios)
                verdicts.append(result)
            else:
                target = result = "info"
            rows.append(
                [workers, name, median, spread, per_core, f"{r_med} ({r_spread})", target, result]
            )
    header = [
        "num_workers",
        "variant",
        "images/s median",
        "images/s p25-p75",
        "images/s per core",
        "ratio to folder median (p25-p75)",
        "target",
        "result",
    ]
    table = markdown_table(rows, header, pad=True)
    groups = sum(len(s.row_groups) for s in index.shards)
    notes = [
        f"{args.images} bundled JPEGs (128-256 px); shards: {len(index.shards)} files, "
        f"{groups} row groups of {args.row_group_size}, written by prepare_shards in "
        f"{prepare_s:.1f} s (reads + verifies every image)",
        f"build_loader(images, TwoViews({args.size}), batch_size={args.batch_size}, "
        f"num_workers=N), persistent workers, torch threads {args.threads} in the main process",
        f"{args.epochs} timed rounds after one warm-up epoch per variant; in each round every "
        "variant runs one epoch (order shuffled) with the same sampler epoch, so all draw the "
        "same augmentations",
        "an image = one sample of two augmented views; per core = images/s / max(N, 1)",
        "ratio = parquet / folder images/s in the same round, then median and quartiles; PASS: "
        f"median >= {TARGET_RATIO}; PASS (within noise): upper quartile >= {TARGET_RATIO}",
        f"cache1 (info): a 1-row-group cache, so under shuffling nearly every sample reads a "
        f"whole row group ({args.row_group_size} images); the default 8-group cache holds "
        f"{min(groups, 8)} of the {groups} row groups here",
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    notes.append(
        f"load average (1, 5, 15 min) at the start: {load_start}; at the end: {load} "
        "(well above 0 means other work shared the cores)"
    )
    body = table + "\n\n" + "\n".join(f"- {line}" for line in notes) + "\n"
    overall = "FAIL" if "FAIL" in verdicts else "PASS"
    print()
    print(body)
    print(f"overall (parquet >= {TARGET_RATIO}x folder): {overall}")
    if args.record:
        title = f"input_pipeline ({'quick' if args.quick else 'default'}, {device.type})"
        record(args.record, title, machine, body + f"\noverall: **{overall}**\n")


if __name__ == "__main__":
    main()
