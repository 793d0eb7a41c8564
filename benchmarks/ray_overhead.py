"""Ray Train's per-step overhead against the same dupr/ loop in a plain process (CPU).

    python benchmarks/ray_overhead.py [--record benchmarks/RESULTS.md] [--quick]

Both sides train the same model on the same images with the same `dupr.train.train` loop: once
called directly in this process, once through `dupr_platform.pretrain.run_pretraining` (a local
Ray instance, one TorchTrainer worker with all cores, checkpoints to a local folder, metrics to
a local MLflow store). Per-step time is taken from the loop's own throughput windows after the
first one (warm-up excluded), so both are measured the same way; the Ray side also reports its
start-up: from the call to the first training step.

Target: Ray Train per-step time <= 1.10 × the plain loop's, after start-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, markdown_table, record  # noqa: E402

from dupr.config import DUPRConfig, ModelConfig, OptimConfig, validate  # noqa: E402
from dupr.data import ImageFolderDataset, embedded_image_folder  # noqa: E402
from dupr.data.two_views import build_loader  # noqa: E402
from dupr.model import DUPR  # noqa: E402
from dupr.train import build_state, train  # noqa: E402
from dupr.views import TwoViews  # noqa: E402


def method(epochs: int, image_size: int) -> DUPRConfig:
    model = ModelConfig(
        backbone="resnet18",
        image_size=image_size,
        roi_size=(7, 7, 7, 3),
        queue_size=256,
        momentum=0.99,
        hidden_dim=128,
    )
    return validate(
        DUPRConfig(model=model, optim=OptimConfig(lr=0.01, batch_size=16, epochs=epochs))
    )


def plain_run(cfg: DUPRConfig, images: int, log_every: int) -> list[float]:
    """Seconds per step for each logged window, training in this process."""
    torch.manual_seed(cfg.seed)
    data = ImageFolderDataset(embedded_image_folder(images))
    loader = build_loader(data, TwoViews(cfg.model.image_size, cfg.augment), cfg.optim.batch_size)
    state = build_state(DUPR(cfg.model), cfg.optim, len(loader), torch.device("cpu"))
    windows: list[float] = []
    train(
        state,
        loader,
        cfg.optim,
        torch.device("cpu"),
        log_every=log_every,
        on_log=lambda step, m: windows.append(cfg.optim.batch_size / m["images_per_s"]),
    )
    return windows


def ray_run(cfg: DUPRConfig, images: int, log_every: int, cores: int) -> tuple[list[float], float]:
    """Seconds per step per window through Ray Train, and start-up seconds (call → first step)."""
    import ray
    from mlflow.tracking import MlflowClient

    from dupr_platform.pretrain import PretrainJob, run_pretraining

    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        job = PretrainJob(
            name="overhead",
            method=cfg,
            data=str(embedded_image_folder(images)),
            storage=f"{tmp}/store",
            tracking_uri=tracking,
            experiment="overhead",
            num_workers=1,
            cpus_per_worker=cores,
            log_every=log_every,
        ).validate()
        start_ms = time.time() * 1000
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        try:
            result = run_pretraining(job)
        finally:
            ray.shutdown()
        history = MlflowClient(tracking).get_metric_history(result.run_id, "images_per_s")
        history.sort(key=lambda m: m.step)
        first_window_s = log_every * cfg.optim.batch_size / history[0].value
        startup = (history[0].timestamp - start_ms) / 1000 - first_window_s
        return [cfg.optim.batch_size / m.value for m in history], startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="64 images, 2 epochs, 64 px")
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.image_size = 64, 2, 64
    cores = torch.get_num_threads()
    machine = machine_lines("cpu")
    print("\n".join(machine))
    cfg = method(args.epochs, args.image_size)
    # The plain loop runs before and after the Ray run, so slow drift of a shared machine
    # affects baseline and Ray alike.
    plain = plain_run(cfg, args.images, args.log_every)[1:]
    on_ray, startup = ray_run(cfg, args.images, args.log_every, cores)
    on_ray = on_ray[1:]
    plain += plain_run(cfg, args.images, args.log_every)[1:]
    p, r = statistics.median(plain), statistics.median(on_ray)
    overhead = r / p - 1
    rows = [
        ["plain process", f"{p * 1000:.1f}", "-", "-", "baseline", "baseline"],
        [
            "Ray Train (1 worker)",
            f"{r * 1000:.1f}",
            f"{overhead * 100:+.1f}%",
            f"{startup:.1f}",
            "<= +10%",
            "PASS" if overhead <= 0.10 else "FAIL",
        ],
    ]
    table = markdown_table(
        ["variant", "step ms (median)", "per-step overhead", "start-up s", "target", "result"], rows
    )
    notes = (
        f"\n- resnet18 at {args.image_size} px, batch 16, K=256, {args.images} embedded images, "
        f"{args.epochs} epochs; medians over throughput windows of {args.log_every} steps, first "
        "window excluded; plain loop run before and after the Ray run; Ray: local instance, checkpoint every epoch to a local folder, metrics "
        "to a local MLflow store; start-up = call to first training step (ray.init included)\n"
    )
    print("\n" + table + notes)
    if args.record:
        record(
            args.record,
            f"ray_overhead ({'quick' if args.quick else 'default'}, cpu)",
            machine,
            table + notes,
        )


if __name__ == "__main__":
    main()
