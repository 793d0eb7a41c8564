"""Ray Data's two-view pipeline, pass by pass: what each epoch costs beyond the decoding itself.

Why: with `data_loader=ray` every epoch is a new execution of the Ray Data pipeline (Ray Train's
`streaming_split` re-runs it once per epoch). On a GPU node (issue 14, run 4) the pipeline spent
most of each 4,096-image epoch starting its decoding workers anew (Ray Data starts an actor
pool's actors for every execution, ray-project/ray#46479), and the GPU waited 77 % of the loop.
This measures that start-up per pass against the decoding work, on any machine.

What runs: `--images` ImageNet-like JPEGs (512; `--quick`: 128) built offline from the bundled
photographs, packed into Parquet shards of 64, then:

  one process      `DecodeTwoViews` over every image in this process, in batches of 16 (the
                   baseline: the decoding and augmentation work itself, per process)
  Ray Data pass p  `two_view_dataset` on a local Ray instance with every usable core,
                   `--decoders` decoding workers (cores - 1: Ray Data's file listing takes a
                   whole CPU), read through `streaming_split(1, equal=True)` and `RayDataLoader`
                   as a Ray Train worker reads it; `--passes` passes (4) one after another

Reported per pass: seconds to the first batch and for the whole pass, images/s, the decoding
processes it used and how many of them decoded in earlier passes, and the overhead: the
pass's time minus the ideal (images / (baseline images/s per process x decoders)). Pass 0 always
starts processes; what matters is the passes after it, each a training epoch.

    python benchmarks/ray_data_passes.py --quick     # ~30 s smoke run
    python benchmarks/ray_data_passes.py --record benchmarks/RESULTS.md    # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from _common import build_folder, fill_sizes, machine_lines, record

from dupr.config import preset
from dupr.io import markdown_table
from dupr_platform.ray_data import DecodeTwoViews, IdIndex, RayDataLoader, two_view_dataset
from dupr_platform.shards import prepare_shards
from dupr_platform.software import usable_cores

DEFAULTS = {"images": 512, "passes": 4}
QUICK = {"images": 128, "passes": 3}
METHOD = "dupr"  # the main preset: RandAugment views, the costliest augmentation
BATCH = 64  # the per-GPU batch of the paper's setting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, help="JPEGs in the shard set (512)")
    p.add_argument("--passes", type=int, help="passes (epochs) over the dataset (4)")
    p.add_argument("--size", type=int, default=224, help="view side in pixels")
    p.add_argument("--decoders", type=int, help="decoding workers (usable cores - 1, at least 1)")
    p.add_argument("--photometric-on", choices=("loader", "device"), default="loader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 128 images, 3 passes")
    p.add_argument("--record", metavar="FILE", help="append the table to this Markdown file")
    args = p.parse_args(argv)
    fill_sizes(args, args.quick, DEFAULTS, QUICK)
    args.decoders = args.decoders or max(1, usable_cores() - 1)
    if min(args.images, args.passes, args.size, args.decoders) < 1 or args.images < BATCH:
        p.error(f"--images must be >= {BATCH}; --passes, --size, --decoders >= 1")
    return args


def one_process_rate(shards: Path, augment: dict, args: argparse.Namespace) -> float:
    """Images/s of the map stage in this process: the work a decoding worker does."""
    ids, images = [], []
    for path in sorted(shards.glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "image"])
        ids += table.column("id").to_pylist()
        images += table.column("image").to_pylist()
    decode = DecodeTwoViews(args.size, augment, args.seed, IdIndex(ids))

    def run(rows: range) -> None:
        for start in range(rows.start, rows.stop, 16):
            chunk = slice(start, min(start + 16, rows.stop))
            decode(
                {
                    "id": np.array(ids[chunk], dtype=object),
                    "image": np.array(images[chunk], dtype=object),
                }
            )

    run(range(16))  # first use of PIL and the transforms: untimed
    start = time.perf_counter()
    run(range(len(ids)))
    return len(ids) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    machine = machine_lines("cpu")
    print("\n".join(machine), flush=True)
    augment = {**preset(METHOD).to_dict()["augment"], "photometric_on": args.photometric_on}

    with tempfile.TemporaryDirectory(prefix="dupr-ray-passes-") as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        size = build_folder(folder, args.images, args.seed)
        prepare_shards(str(folder), str(shards), images_per_shard=64, workers=usable_cores())
        rate = one_process_rate(shards, augment, args)
        ideal = args.images / (rate * args.decoders)
        print(f"one process: {rate:.1f} images/s; ideal pass {ideal:.1f} s", flush=True)

        ray.init(
            address="local", num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False
        )
        try:
            dataset = two_view_dataset(
                str(shards),
                args.size,
                augment,
                seed=args.seed,
                concurrency=args.decoders,
                record_pid=True,
            )
            # What a Ray Train worker iterates (DataConfig splits every dataset this way).
            shard = dataset.streaming_split(1, equal=True)[0]
            loader = RayDataLoader(shard, BATCH, args.images, 1)
            rows: list[list] = []
            seen: set[int] = set()  # decoding processes of earlier passes
            overheads: list[float] = []
            for p in range(args.passes):
                loader.sampler.set_epoch(p)
                start, first = time.perf_counter(), None
                pids: set[int] = set()
                for batch in loader:
                    first = first if first is not None else time.perf_counter() - start
                    pids |= set(batch["pid"].tolist())
                seconds = time.perf_counter() - start
                images = loader.steps_per_epoch() * BATCH
                reused = len(pids & seen)
                seen |= pids
                overhead = seconds - images / (rate * args.decoders)
                if p > 0:
                    overheads.append(overhead)
                rows.append(
                    [
                        p,
                        f"{first:.1f}",
                        f"{seconds:.1f}",
                        f"{images / seconds:.1f}",
                        f"{len(pids)} ({reused} seen before)",
                        f"{overhead:.1f} ({overhead / seconds:.0%})",
                    ]
                )
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
        finally:
            ray.shutdown()

    table = markdown_table(
        rows,
        [
            "pass",
            "first batch s",
            "pass s",
            "images/s",
            "decoding processes (seen in earlier passes)",
            "overhead s (of the pass)",
        ],
        pad=True,
    )
    steady = statistics.median(overheads) if overheads else float("nan")
    notes = [
        f"{args.images} JPEGs built offline from the bundled photographs "
        f"({size / args.images / 1024:.0f} KB on average) in Parquet shards of 64; the "
        f"`{METHOD}` preset's views at "
        f"{args.size} px, colour steps on the {args.photometric_on}",
        f"baseline, `DecodeTwoViews` in one process: {rate:.1f} images/s; ideal pass with "
        f"{args.decoders} decoding worker{'s' if args.decoders > 1 else ''}: {ideal:.1f} s",
        f"Ray Data: local instance with {usable_cores()} CPUs, {args.decoders} decoding "
        f"worker{'s' if args.decoders > 1 else ''} at 1 CPU, read through "
        f"`streaming_split(1, equal=True)` and `RayDataLoader` (batch {BATCH})",
        f"overhead of the passes after the first (median): {steady:.1f} s per pass, what every "
        "training epoch pays on top of its decoding work",
    ]
    body = table + "\n\n" + "\n".join(f"- {line}" for line in notes) + "\n"
    print("\n" + body)
    if args.record:
        record(
            args.record,
            f"ray_data_passes ({'quick' if args.quick else 'default'}, cpu)",
            machine,
            body,
        )


if __name__ == "__main__":
    main()
