"""Does the GPU wait for data? The training loop on one GPU fed by the torch loader from JPEGs.

    python benchmarks/gpu_input.py --record benchmarks/RESULTS.md   # on a GPU node, ~1 min
    python benchmarks/gpu_input.py --quick --device cpu             # rehearsal of the script

Why: at 2,000 images/s a GPU needs 2,000 decoded, augmented pairs of views per second from the
node's CPU cores. What runs, in one process on the GPU node:

1. a folder of `--images` ImageNet-like JPEGs (~95 KB, 333-500 px), built offline from the
   bundled photos by all cores;
2. the GPU alone: `dupr.train.train_step` of the benchmark's model (DUPR's main preset with
   RandAugment, ResNet-50, 224 px, K = 65536, bf16, channels_last, with the levers of the
   `gpu_step.py` row `--variant`, by default the fastest eager ones as a CUDA graph: the data
   must keep up with the fastest step) on one batch already on the GPU, as `gpu_step.py`
   times it; and on uint8 crops with their colour choices, the step then running the colour
   steps too (`augment.photometric_on=device`, `dupr.photometric`); each only where a row
   of (3) has its colour steps there;
3. the loader alone, one epoch without training, for each of `--loaders`:
   torch: `dupr.data.two_views.build_loader` over the folder (`--workers` processes, default
   every usable core but one; pinned memory), the default `data_loader=torch`;
   ray: the same images packed into Parquet shards (`dupr_platform.shards`) and read by the
   platform's Ray Data pipeline (`two_view_dataset` on a local Ray instance with every core,
   `--workers` - 1 decoding tasks and a CPU for the reads; `RayDataLoader`), the
   `data_loader=ray` path;
   each with the colour steps in the loader and on the device (`--photometric`; the Ray rows
   by default on the device only, `--ray-photometric`), with the time to the first batch;
   timed is each loader's second epoch, after one that starts its processes (the torch
   loader's persistent workers, Ray's task workers), as in training;
4. each loader with the GPU: `dupr.train.train` for two epochs, the first a warm-up (worker
   start-up, page cache, cuDNN autotuning); from the second its logged `data_wait_s` (time the
   loop waits for the next batch) and images/s give the fraction of the step spent waiting.

The GPU waits when a loader's rate (3) is below the GPU's (2): then (4) runs at about the
loader's rate, and images/s per loader process says how many cores the GPU's rate needs. The
Ray path needs Ray on the node; where `import ray` fails its rows say so and the rest stands.
A run that reaches `--budget-s` (SIGALRM) or is stopped by SIGTERM still records the rows it
has. Give it a budget below an outer time limit: that limit's SIGTERM reaches the whole process
group, Ray's own processes too, whose end takes the driver down before it can record.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    add_model_arguments,
    build_folder,
    machine_lines,
    report,
    resolve_device,
    usable_cores,
)
from gpu_step import BEST, VARIANTS, build_variant, synthetic_batch, time_steps  # noqa: E402

from dupr.config import preset  # noqa: E402
from dupr.data import ImageFolderDataset  # noqa: E402
from dupr.data import folder as image_files  # noqa: E402
from dupr.data.two_views import build_loader  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.photometric import PhotometricDraw  # noqa: E402
from dupr.train import train  # noqa: E402
from dupr.views import TwoViews  # noqa: E402

METHOD = "dupr"  # the main preset: RandAugment views, the costliest augmentation
# The gpu_step rows this can train with: DUPR's (the preset above), any levers.
DUPR_VARIANTS = [name for name, variant in VARIANTS.items() if variant.method == METHOD]
LOADERS = ("torch", "ray")
PLACEMENTS = ("loader", "device")  # where the colour steps run: augment.photometric_on


class TimeLimit(Exception):
    """The budget's SIGALRM or the caller's SIGTERM: record what was measured, then stop."""


STOPPING: list[bool] = []  # set on SIGTERM: an error after it (a loader worker the same
# signal ended) is the time limit, not a failure of that loader


def _stop(signum, frame):
    STOPPING.append(True)
    raise TimeLimit


def augment_config(photometric_on: str) -> dict:
    augment = preset(METHOD).to_dict()["augment"]
    return {**augment, "photometric_on": photometric_on}


def colour_batch(batch: dict, device) -> dict:
    """`batch` as the loader ships it with ``photometric_on=device``: uint8 crops on the device,
    their colour choices (drawn as in training) on the host."""
    draw = PhotometricDraw(preset(METHOD).augment)
    n, _, size, _ = batch["view1"].shape
    out = dict(batch)
    for v in ("1", "2"):
        out[f"view{v}"] = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8).to(device)
        out[f"photometric{v}"] = torch.stack([draw() for _ in range(n)])
    return out


def loader_rate(loader, epoch: int) -> tuple[float, float]:
    """(images/s, seconds to the first batch) of one epoch of the loader alone, start included.

    The first batch's wait is the epoch's start-up: every epoch re-executes Ray Data's pipeline
    (listing, reads, the first blocks' decoding), the torch loader's persistent workers start
    once. It is not subtracted from the rate: the decoding processes work ahead while the first
    batch is awaited, so the rest of the epoch would look faster than decoding is.
    """
    loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    batches = iter(loader)
    count = len(next(batches)["index"])
    first_s = time.perf_counter() - start
    count += sum(len(batch["index"]) for batch in batches)
    return count / (time.perf_counter() - start), first_s


def loop_with_gpu(state, optim, loader, args, device) -> tuple[float, float]:
    """(images/s, fraction of the time waiting for data) of the second of two epochs of
    `dupr.train.train` from step 0."""
    windows: list[dict[str, float]] = []
    steps_per_epoch = args.images // args.batch
    state.epoch = state.step = 0
    train(
        state,
        loader,
        dataclasses.replace(optim, epochs=2),
        device,
        log_every=args.log_every,
        on_log=lambda step, m: windows.append({"step": step, **m}),
    )
    loop_s = wait_s = 0.0
    steps = 0
    for before, window in zip([0.0, *(w["step"] for w in windows)], windows, strict=False):
        n = window["step"] - before
        if before >= steps_per_epoch:  # a window of the second epoch
            loop_s += n * args.batch / window["images_per_s"]
            wait_s += n * window["data_wait_s"]
            steps += int(n)
    return steps * args.batch / loop_s, wait_s / loop_s


def torch_loader(folder: Path, args, device, photometric_on: str):
    cfg = preset(METHOD)
    cfg.augment.photometric_on = photometric_on
    return build_loader(
        ImageFolderDataset(folder),
        TwoViews(args.size, cfg.augment),
        args.batch,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )


def ray_loader(folder: Path, shards: Path, args, device, photometric_on: str):
    """The `data_loader=ray` path on a local Ray instance (started here, stopped by main)."""
    import ray

    from dupr_platform.ray_data import RayDataLoader, two_view_dataset
    from dupr_platform.shards import prepare_shards

    if not shards.exists():
        prepare_shards(str(folder), str(shards), images_per_shard=256, workers=usable_cores())
    ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False)
    signal.signal(signal.SIGTERM, _stop)  # Ray's core worker installed its own
    dataset = two_view_dataset(
        str(shards),
        args.size,
        augment_config(photometric_on),
        seed=0,
        concurrency=max(1, args.workers - 1),
    )
    return RayDataLoader(
        dataset.iterator(), args.batch, args.images, 1, pin_memory=device.type == "cuda"
    )


def not_measured(err: Exception) -> str:
    """A row's note for a loader that could not run: the error's type and first line."""
    return f"not measured: {type(err).__name__}: {str(err).splitlines()[0][:100]}"


def measure(folder: Path, shards: Path, args, device, rows: list, verdicts: list) -> None:
    """Parts 2-4 of the module docstring, appending to `rows` and `verdicts` as they finish."""
    cores = usable_cores()
    runs = [
        (name, placement)
        for name in args.loaders
        for placement in (args.photometric if name == "torch" else args.ray_photometric)
    ]
    if "ray" in args.loaders:
        try:
            import ray  # noqa: F401
        except Exception as err:  # not installed on this node: say so, measure the rest
            why = not_measured(err)
            for name, placement in runs:
                if name == "ray":
                    print(f"ray, colour steps {placement}: {why}", flush=True)
                    rows.append([name, placement, "loader", "-", "-", "-", why])
            runs = [(name, placement) for name, placement in runs if name != "ray"]
    if not runs:
        return
    # 2. The GPU alone, for each placement of the colour steps that a loader below uses (a
    # compiled variant compiles each placement's step on its own).
    state, optim = build_variant(VARIANTS[args.variant], args, device)
    batch = synthetic_batch(args.batch, args.size, device)
    gpu_rate: dict[str, float] = {}
    for placement in [p for p in PLACEMENTS if p in {used for _, used in runs}]:
        steps_batch = batch if placement == "loader" else colour_batch(batch, device)
        time_steps(state, optim, steps_batch, device, 10)
        gpu_rate[placement] = args.batch / statistics.median(
            time_steps(state, optim, steps_batch, device, 10) for _ in range(3)
        )
        print(
            f"GPU alone, colour steps {placement}: {gpu_rate[placement]:.0f} images/s", flush=True
        )
        what = "GPU alone (batch on the device)"
        rows.append(["-", placement, what, f"{gpu_rate[placement]:.0f}", "-", "-", "-"])
    del batch

    # 3 and 4, per loader and placement of the colour steps.
    for name, placement in runs:
        processes = args.workers if name == "torch" else max(1, args.workers - 1) + 1
        label = f"{name}, colour steps {placement}"
        try:
            if name == "torch":
                loader = torch_loader(folder, args, device, placement)
            else:
                loader = ray_loader(folder, shards, args, device, placement)
            # Starts the loader's processes; every epoch after this one reuses them.
            loader_rate(loader, 0)
            data_rate, first_s = loader_rate(loader, 1)
            print(
                f"{label}: loader alone {data_rate:.0f} images/s, first batch after "
                f"{first_s:.1f} s",
                flush=True,
            )
            loop_rate, waiting = loop_with_gpu(state, optim, loader, args, device)
            print(f"{label}: loader + GPU {loop_rate:.0f} images/s, waiting {waiting:.1%}")
        except TimeLimit:
            raise
        except Exception as err:  # e.g. the local Ray instance does not start
            if STOPPING:
                raise TimeLimit from err
            why = not_measured(err)
            print(f"{label}: {why}", flush=True)
            rows.append([name, placement, "loader", "-", "-", "-", why])
            continue
        finally:
            loader = None
            gc.collect()  # ends the torch loader's persistent workers
            if name == "ray" and "ray" in sys.modules:
                sys.modules["ray"].shutdown()
        per_process = data_rate / processes
        rows.append(
            [
                name,
                placement,
                "loader alone",
                f"{data_rate:.0f}",
                f"{per_process:.0f}",
                f"{first_s:.1f}",
                "-",
            ]
        )
        rows.append(
            [name, placement, "training loop", f"{loop_rate:.0f}", "-", "-", f"{waiting:.1%}"]
        )
        gpu = gpu_rate[placement]
        epoch_s = args.images / data_rate
        if first_s > 0.2 * epoch_s:
            verdicts.append(
                f"{label}: {first_s:.1f} s of the epoch's {epoch_s:.1f} s pass before the "
                "first batch, a start-up every epoch pays: the rate is a lower bound for "
                "longer epochs"
            )
        if data_rate < gpu:
            verdicts.append(
                f"{label}: the GPU waits for data: the loader delivers "
                f"{data_rate / gpu:.0%} of the GPU's rate; at {per_process:.0f} "
                f"images/s per process the GPU's rate needs about "
                f"{gpu / per_process:.0f} processes ({cores} cores here)"
            )
        else:
            verdicts.append(f"{label}: keeps up, {data_rate / gpu:.2f}x the GPU's rate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the folder")
    parser.add_argument("--workers", type=int, help="loader processes (default: cores - 1)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="torch, ray or both")
    parser.add_argument(
        "--photometric",
        default=",".join(PLACEMENTS),
        help="where the colour steps run: loader, device or both",
    )
    parser.add_argument(
        "--ray-photometric",
        default="device",
        help="the same for the Ray rows (default device: the Ray path is for GPU nodes short "
        "of CPU, and each of its rows takes more than a minute)",
    )
    parser.add_argument(
        "--variant",
        default=f"{BEST} + CUDA graph",
        help=f"the gpu_step row whose levers the model trains with (of: {', '.join(DUPR_VARIANTS)})",
    )
    parser.add_argument("--log-every", type=int, default=8, help="steps per logged window")
    parser.add_argument(
        "--budget-s", type=float, help="stop measuring after this long (folder build included)"
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, 32 images")
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    if args.variant not in DUPR_VARIANTS:
        parser.error(f"--variant: {args.variant!r} is not one of {', '.join(DUPR_VARIANTS)}")
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if any(name not in LOADERS for name in args.loaders):
        parser.error(f"--loaders: valid are {', '.join(LOADERS)}")
    for option in ("photometric", "ray_photometric"):
        names = [name.strip() for name in getattr(args, option).split(",") if name.strip()]
        if not names or any(name not in PLACEMENTS for name in names):
            parser.error(f"--{option.replace('_', '-')}: valid are {', '.join(PLACEMENTS)}")
        setattr(args, option, names)
    if args.quick:
        args.backbone, args.size, args.batch, args.queue = "resnet18", 64, 8, 1024
        args.images, args.log_every = 32, 2
    if args.workers is None:
        args.workers = max(1, usable_cores() - 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    machine = machine_lines(str(device))
    print("\n".join(machine), flush=True)
    cores = usable_cores()
    rows: list[list[str]] = []
    verdicts: list[str] = []

    with tempfile.TemporaryDirectory(prefix="dupr-gpu-input-") as tmp:
        folder = Path(tmp) / "images"
        start = time.perf_counter()
        size = build_folder(folder, args.images, seed=0, processes=cores)
        print(
            f"{args.images} JPEGs ({size / args.images / 1024:.0f} KB average) built in "
            f"{time.perf_counter() - start:.1f} s",
            flush=True,
        )

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGALRM, _stop)
        if args.budget_s:
            signal.alarm(max(1, int(args.budget_s - (time.perf_counter() - start))))
        try:
            measure(folder, Path(tmp) / "shards", args, device, rows, verdicts)
        except TimeLimit:
            verdicts.append("stopped by the time limit: the rows above are all")
            print("stopped by the time limit: recording what was measured", flush=True)

    header = [
        "loader",
        "colour steps",
        "what runs",
        "images/s",
        "images/s per process",
        "first batch s",
        "data_wait fraction",
    ]
    table = markdown_table(rows, header, pad=True)
    cfg = preset(METHOD)
    decoder = "TorchCodec" if image_files.decode_jpeg is not None else "PIL (no TorchCodec here)"
    notes = [
        f"{METHOD} preset ({cfg.augment.preset} views), {args.backbone}, {args.size} px, batch "
        f"{args.batch}, K={args.queue}, bf16 autocast (on a GPU), channels_last; levers: "
        f"{args.variant.removeprefix('dupr + ')}",
        f"{args.images} ImageNet-like JPEGs ({size / args.images / 1024:.0f} KB average), page "
        f"cache warm after the first epoch; {cores} usable cores; decoded by {decoder}",
        "colour steps in the loader: PIL per image in the loader processes; on the device: "
        "the loader ships uint8 crops and the drawn choices, the step applies them batched "
        "(augment.photometric_on)",
        f"torch: {args.workers} loader processes over the folder, pinned memory; ray: Parquet "
        f"shards of 256 images, a local Ray instance with {cores} CPUs, "
        f"{max(1, args.workers - 1)} decoding tasks (+1 CPU for reads)",
        "loader alone: images/s of the second epoch, its start included (the first starts the "
        "loader's processes); first batch s: that start, which every epoch pays",
        f"training loop: epoch 2 of `dupr.train.train` ({args.images // args.batch} steps), "
        f"windows of {args.log_every} steps; data_wait fraction = waiting time / loop time",
        *(f"result, {v}" for v in verdicts),
    ]
    # A compiled variant trains as optim.compile does: its colour steps compile too.
    compiled = VARIANTS[args.variant].compiled is not None
    report(args, "gpu_input", device, machine, table, notes, "; compiled" if compiled else "")


if __name__ == "__main__":
    main()
