"""Does the GPU wait for data? The training loop on one GPU fed by the torch loader from JPEGs.

    python benchmarks/gpu_input.py --record benchmarks/RESULTS.md   # on a GPU node, ~1 min
    python benchmarks/gpu_input.py --quick --device cpu             # rehearsal of the script

Why: at 2,000 images/s a GPU needs 2,000 decoded, augmented pairs of views per second from the
node's CPU cores. What runs, in one process on the GPU node:

1. a folder of `--images` ImageNet-like JPEGs (~95 KB, 333-500 px), built offline from the
   bundled photos by all cores;
2. the GPU alone: `dupr.train.train_step` of the benchmark's model (DUPR's main preset with
   RandAugment, ResNet-50, 224 px, K = 65536, bf16, channels_last) on one batch already on the
   GPU, as `gpu_step.py` times it;
3. the loader alone, one epoch without training, for each of `--loaders`:
   torch: `dupr.data.two_views.build_loader` over the folder (`--workers` processes, default
   every usable core but one; pinned memory), the default `data_loader=torch`;
   ray: the same images packed into Parquet shards (`dupr_platform.shards`) and read by the
   platform's Ray Data pipeline (`two_view_dataset` on a local Ray instance with every core,
   `--workers` - 1 decoding actors and a CPU for the reads; `RayDataLoader`), the
   `data_loader=ray` path;
4. each loader with the GPU: `dupr.train.train` for two epochs, the first a warm-up (worker
   start-up, page cache, cuDNN autotuning); from the second its logged `data_wait_s` (time the
   loop waits for the next batch) and images/s give the fraction of the step spent waiting.

The GPU waits when a loader's rate (3) is below the GPU's (2): then (4) runs at about the
loader's rate, and images/s per loader process says how many cores the GPU's rate needs. The
Ray path needs Ray on the node; where `import ray` fails its rows say so and the rest stands.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import build_folder, machine_lines, record, resolve_device, usable_cores  # noqa: E402
from gpu_step import build, synthetic_batch, time_steps  # noqa: E402

from dupr.config import preset  # noqa: E402
from dupr.data import ImageFolderDataset  # noqa: E402
from dupr.data.two_views import build_loader  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
from dupr.train import train  # noqa: E402
from dupr.views import TwoViews  # noqa: E402

METHOD = "dupr"  # the main preset: RandAugment views, the costliest augmentation
LOADERS = ("torch", "ray")


def loader_rate(loader, epoch: int) -> float:
    """Images per second of one epoch of the loader alone (iterator start included)."""
    loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    count = sum(len(batch["index"]) for batch in loader)
    return count / (time.perf_counter() - start)


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


def torch_loader(folder: Path, args, device):
    cfg = preset(METHOD)
    return build_loader(
        ImageFolderDataset(folder),
        TwoViews(args.size, cfg.augment),
        args.batch,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )


def ray_loader(folder: Path, shards: Path, args, device):
    """The `data_loader=ray` path on a local Ray instance (started here, stopped by main)."""
    import ray

    from dupr_platform.ray_data import RayDataLoader, two_view_dataset
    from dupr_platform.shards import prepare_shards

    prepare_shards(str(folder), str(shards), images_per_shard=256, workers=usable_cores())
    ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False)
    dataset = two_view_dataset(
        str(shards),
        args.size,
        preset(METHOD).to_dict()["augment"],
        seed=0,
        concurrency=max(1, args.workers - 1),
    )
    return RayDataLoader(dataset.iterator(), args.batch, args.images, 1, device=str(device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch")
    parser.add_argument("--queue", type=int, default=65536, help="K, keys per memory bank")
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the folder")
    parser.add_argument("--workers", type=int, help="loader processes (default: cores - 1)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="torch, ray or both")
    parser.add_argument("--log-every", type=int, default=8, help="steps per logged window")
    parser.add_argument("--quick", action="store_true", help="ResNet-18, 64 px, 64 images")
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if any(name not in LOADERS for name in args.loaders):
        parser.error(f"--loaders: valid are {', '.join(LOADERS)}")
    if args.quick:
        args.backbone, args.size, args.batch, args.queue = "resnet18", 64, 8, 1024
        args.images, args.log_every = 64, 2
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

        # 2. The GPU alone.
        state, optim = build(METHOD, args, device)
        batch = synthetic_batch(args.batch, args.size, device)
        time_steps(state, optim, batch, device, 10)
        gpu_rate = args.batch / statistics.median(
            time_steps(state, optim, batch, device, 10) for _ in range(3)
        )
        del batch
        print(f"GPU alone: {gpu_rate:.0f} images/s", flush=True)
        rows.append(["-", "GPU alone (batch on the device)", f"{gpu_rate:.0f}", "-", "-"])

        # 3 and 4, per loader.
        for name in args.loaders:
            processes = args.workers if name == "torch" else max(1, args.workers - 1) + 1
            try:
                if name == "torch":
                    loader = torch_loader(folder, args, device)
                else:
                    loader = ray_loader(folder, Path(tmp) / "shards", args, device)
                loader_rate(loader, 0)  # starts the workers or actors
                data_rate = loader_rate(loader, 1)
                print(f"{name} loader alone: {data_rate:.0f} images/s", flush=True)
                loop_rate, waiting = loop_with_gpu(state, optim, loader, args, device)
                print(f"{name} loader + GPU: {loop_rate:.0f} images/s, waiting {waiting:.1%}")
            except Exception as err:  # e.g. Ray is not installed on this node
                why = f"not measured: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
                print(f"{name}: {why}", flush=True)
                rows.append([name, "loader", "-", "-", why])
                continue
            finally:
                loader = None
                gc.collect()  # ends the torch loader's persistent workers
                if name == "ray" and "ray" in sys.modules:
                    sys.modules["ray"].shutdown()
            per_process = data_rate / processes
            rows.append([name, "loader alone", f"{data_rate:.0f}", f"{per_process:.0f}", "-"])
            rows.append([name, "training loop", f"{loop_rate:.0f}", "-", f"{waiting:.1%}"])
            if data_rate < gpu_rate:
                verdicts.append(
                    f"{name}: the GPU waits for data: the loader delivers "
                    f"{data_rate / gpu_rate:.0%} of the GPU's rate; at {per_process:.0f} "
                    f"images/s per process the GPU's rate needs about "
                    f"{gpu_rate / per_process:.0f} processes ({cores} cores here)"
                )
            else:
                verdicts.append(f"{name}: keeps up, {data_rate / gpu_rate:.2f}x the GPU's rate")

    header = ["loader", "what runs", "images/s", "images/s per process", "data_wait fraction"]
    table = markdown_table(rows, header, pad=True)
    cfg = preset(METHOD)
    notes = [
        f"{METHOD} preset ({cfg.augment.preset} views), {args.backbone}, {args.size} px, batch "
        f"{args.batch}, K={args.queue}, bf16 autocast (on a GPU), channels_last",
        f"{args.images} ImageNet-like JPEGs ({size / args.images / 1024:.0f} KB average), page "
        f"cache warm after the first epoch; {cores} usable cores",
        f"torch: {args.workers} loader processes over the folder, pinned memory; ray: Parquet "
        f"shards of 256 images, a local Ray instance with {cores} CPUs, "
        f"{max(1, args.workers - 1)} decoding actors (+1 CPU for reads)",
        f"training loop: epoch 2 of `dupr.train.train` ({args.images // args.batch} steps), "
        f"windows of {args.log_every} steps; data_wait fraction = waiting time / loop time",
        *(f"result, {v}" for v in verdicts),
    ]
    body = table + "\n" + "".join(f"- {line}\n" for line in notes)
    print("\n" + body)
    if args.record:
        title = f"gpu_input ({'quick' if args.quick else 'default'}, {device})"
        record(args.record, title, machine, body)


if __name__ == "__main__":
    main()
