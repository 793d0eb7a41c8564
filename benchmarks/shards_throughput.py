"""Shard preparation throughput: images/s per core, Ray tasks vs a plain single-process pass.

Why: ImageNet is 1.28 M JPEGs. `python -m dupr_platform.shards SRC DEST` reads and fully decodes
every one (undecodable files are skipped, not found mid-training) and packs them into Parquet
shards, in one Ray task per shard across a cluster. This measures what one core does, whether
the Ray path keeps that rate per core, and what that means for ImageNet on a given cluster.

What runs: a folder of `--images` JPEGs (2,500; `--quick`: 200) built offline from the bundled
photographs (random crops, flips, brightness and sensor-like noise, resized to ImageNet's typical
sizes, 500x375, 375x500, 500x333, 333x500, 400x400; quality 92, ~95 KB on average, where
ImageNet's is ~110 KB), prepared into local shards of `--images-per-shard` (100) by:

  plain              prepare_shards(..., workers=1): one process, one thread reads, decodes and
                     writes (the baseline: what a plain loop over the folder costs)
  1 process, 2 thr   prepare_shards(..., workers=2): one process with two reader/decoder threads
                     (info: what a single machine gets without Ray)
  Ray, N CPUs        write_shards(plan, parallel=True) on a fresh local Ray instance with
                     num_cpus=N (N in --ray-cpus, 1 and 2), one task per shard with 1 CPU

Method: rounds (3; `--quick`: 1); every round runs each variant once into a fresh folder. Ray
instances start (and a warm-up run of one shard per CPU starts their task workers) before the
timer: at ImageNet scale the start-up (~10 s) is nothing next to the hours of work, so the rate
that matters is the steady one. Start-up is reported separately. Timed: plan (listing) + write
+ index commit. Reported: median images/s over rounds and its quartiles, images/s per core
(divided by the cores the variant may use), and the per-core rate as a fraction of the plain
pass's. The estimate for 1.28 M images divides by the measured per-core rate of the largest Ray
run times the number of cores: an estimate assuming linear scaling, not a measurement.

    python benchmarks/shards_throughput.py --quick     # ~1 min smoke run
    python benchmarks/shards_throughput.py --record benchmarks/RESULTS.md    # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import IMAGENET_SIZES, build_folder, fill_sizes, machine_lines, quartiles, record

from dupr.io import markdown_table
from dupr_platform.progress import format_duration
from dupr_platform.shards import ShardIndex, plan_shards, prepare_shards, write_shards

DEFAULTS = {"images": 2500, "rounds": 3}
QUICK = {"images": 200, "rounds": 1}
IMAGENET_IMAGES = 1_281_167  # ILSVRC-2012 train
CLUSTER_CORES = (1, 2, 16, 64, 256)


def timed(run: Callable[[Path], ShardIndex], dest: Path) -> tuple[float, ShardIndex]:
    """Seconds of one preparation into an empty `dest`, and its index."""
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    index = run(dest)
    return time.perf_counter() - start, index


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, help="JPEGs in the folder (2500)")
    p.add_argument("--rounds", type=int, help="timed runs of every variant (3)")
    p.add_argument("--images-per-shard", type=int, default=100)
    p.add_argument("--row-group-size", type=int, default=64)
    p.add_argument("--ray-cpus", default="1,2", help="num_cpus of the local Ray instances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 200 images, 1 round")
    p.add_argument("--record", metavar="FILE", help="append the table to this Markdown file")
    args = p.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    args.ray_cpus = [int(n) for n in args.ray_cpus.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    machine = machine_lines("cpu")
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print("\n".join(machine), flush=True)
    settings = {"images_per_shard": args.images_per_shard, "row_group_size": args.row_group_size}

    with tempfile.TemporaryDirectory(prefix="dupr-shards-bench-") as tmp:
        folder = Path(tmp) / "folder"
        start = time.perf_counter()
        size = build_folder(folder, args.images, args.seed)
        print(
            f"built {args.images} JPEGs ({size / args.images / 1024:.0f} KB on average) in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        dest = Path(tmp) / "shards"

        def single(workers: int):
            return lambda d: prepare_shards(str(folder), str(d), **settings, workers=workers)

        def on_ray(d: Path) -> ShardIndex:
            plan = plan_shards(str(folder), str(d), **settings)
            return write_shards(plan, parallel=True)

        variants: list[tuple[str, int]] = [("plain", 1), ("1 process, 2 threads", 2)]
        variants += [(f"Ray, {n} CPU{'s' if n > 1 else ''}", n) for n in args.ray_cpus]
        rates: dict[str, list[float]] = {name: [] for name, _ in variants}
        startup: dict[str, list[float]] = {}
        reference: ShardIndex | None = None
        for _, cores in variants[:2]:  # first use of Parquet, PIL and the page cache: untimed
            timed(single(cores), dest)
        for r in range(args.rounds):
            for name, cores in variants:
                if name.startswith("Ray"):
                    start = time.perf_counter()
                    ray.init(
                        address="local",
                        num_cpus=cores,
                        include_dashboard=False,
                        log_to_driver=False,
                    )
                    warm = Path(tmp) / "warm-up"
                    shutil.rmtree(warm, ignore_errors=True)
                    warm_src = folder / "n00000000"  # one small class folder, one shard per CPU
                    per_shard = -(-len(list(warm_src.iterdir())) // cores)
                    write_shards(plan_shards(str(warm_src), str(warm), per_shard), parallel=True)
                    startup.setdefault(name, []).append(time.perf_counter() - start)
                    try:
                        seconds, index = timed(on_ray, dest)
                    finally:
                        ray.shutdown()
                else:
                    seconds, index = timed(single(cores), dest)
                reference = reference or index
                assert index == reference, f"{name} wrote a different shard set"
                rates[name].append(args.images / seconds)
                print(f"round {r + 1}/{args.rounds} {name}: {rates[name][-1]:.1f} images/s")

    plain = statistics.median(rates["plain"])  # one core
    rows = []
    per_core_of: dict[str, float] = {}
    for name, cores in variants:
        q1, q2, q3 = quartiles(rates[name])
        per_core = q2 / cores
        per_core_of[name] = per_core
        start_s = f"{statistics.median(startup[name]):.1f}" if name in startup else "-"
        cells = [f"{q2:.1f}", f"{q1:.1f}-{q3:.1f}", f"{per_core:.1f}", f"{per_core / plain:.2f}"]
        rows.append([name, cores, *cells, start_s])
    table = markdown_table(
        rows,
        [
            "variant",
            "cores",
            "images/s median",
            "images/s p25-p75",
            "images/s per core",
            "per core / plain",
            "Ray start-up s",
        ],
        pad=True,
    )
    largest = max((v for v in variants if v[0].startswith("Ray")), key=lambda v: v[1])
    rate = per_core_of[largest[0]]
    estimate_rows = [
        [cores, f"{rate * cores:.0f}", format_duration(IMAGENET_IMAGES / (rate * cores))]
        for cores in CLUSTER_CORES
    ]
    estimate = markdown_table(
        estimate_rows,
        ["CPU cores (Ray tasks)", "images/s (estimated)", "wall time (estimated)"],
        pad=True,
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    notes = [
        f"{args.images} JPEGs built offline from the bundled photographs, ImageNet-like sizes "
        f"({', '.join(f'{w}x{h}' for w, h in IMAGENET_SIZES)}), {size / args.images / 1024:.0f} KB on "
        f"average; {args.images_per_shard} images per shard, row groups of "
        f"{args.row_group_size}; local folder to local folder",
        "an image = read + full decode (to skip undecodable files) + written into a shard; "
        "timed: listing, all shards, the index",
        f"{args.rounds} rounds of every variant; Ray instances started and their task workers "
        "warmed up (one shard per CPU) before the timer; start-up reported apart",
        f"load average (1, 5, 15 min) at the start: {load_start}; at the end: {load}",
    ]
    body = (
        table
        + "\n\n"
        + "\n".join(f"- {line}" for line in notes)
        + f"\n\n**Estimate, not a measurement**: ImageNet train ({IMAGENET_IMAGES:,} images) at "
        f"the measured {rate:.1f} images/s per core of `{largest[0]}`, assuming linear scaling "
        "(one task per core, object-store bandwidth not the limit; listing 1.28 M source "
        "objects not included):\n\n" + estimate + "\n"
    )
    print()
    print(body)
    if args.record:
        title = f"shards_throughput ({'quick' if args.quick else 'default'}, cpu)"
        record(args.record, title, machine, body)


if __name__ == "__main__":
    main()
