"""Ray Train's per-step overhead against the same dupr/ loop in a plain process (CPU).

    python benchmarks/ray_overhead.py [--record benchmarks/RESULTS.md] [--quick] [--rounds N]

Both sides train the same model on the same images with the same `dupr.train.train` loop: once
called directly in this process, once through `dupr_platform.ray_pretrain.run_pretraining` (a local
Ray instance, one TorchTrainer worker with all cores, checkpoints to a local folder, metrics to
a local MLflow store). Per-step time is taken from the loop's own throughput windows after the
first one (warm-up excluded), so both are measured the same way; the Ray side also reports its
start-up: from the call to the first training step.

On a small shared machine the step time drifts between runs by as much as the target, so the
comparison is paired: each round runs the plain loop and a fresh Ray instance back to back
(alternating which goes first), the ratio is taken within the round, and the verdict reads the
median ratio over rounds with its quartiles. The plain loop runs while no Ray instance exists.

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
from _common import machine_lines, quartiles, record  # noqa: E402

from dupr.config import DUPRConfig, ModelConfig, OptimConfig, validate  # noqa: E402
from dupr.data import ImageFolderDataset, bundled_image_folder  # noqa: E402
from dupr.data.two_views import build_loader  # noqa: E402
from dupr.io import markdown_table  # noqa: E402
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
    data = ImageFolderDataset(bundled_image_folder(images))
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


def ray_run(
    cfg: DUPRConfig, images: int, log_every: int, cores: int, niceness: str
) -> tuple[list[float], float]:
    """Seconds per step per window through Ray Train, and start-up seconds (call → first step).

    `niceness` is the training worker's CPU priority: "0", what the launcher asks for, or "15",
    Ray's default for worker processes (shown for comparison).
    """
    import ray
    from mlflow.tracking import MlflowClient

    from dupr_platform.cluster import COMPUTE_PRIORITY
    from dupr_platform.ray_pretrain import PretrainJob, run_pretraining

    with tempfile.TemporaryDirectory() as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        job = PretrainJob(
            name="overhead",
            method=cfg,
            data=str(bundled_image_folder(images)),
            storage=f"{tmp}/store",
            tracking_uri=tracking,
            experiment="overhead",
            num_workers=1,
            cpus_per_worker=cores,
            log_every=log_every,
        ).validate()
        start_ms = time.time() * 1000
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        configured = dict(COMPUTE_PRIORITY)
        COMPUTE_PRIORITY["RAY_worker_niceness"] = niceness  # the dict every launcher reads
        try:
            result = run_pretraining(job)
        finally:
            COMPUTE_PRIORITY.update(configured)
            ray.shutdown()
        history = MlflowClient(tracking).get_metric_history(result.run_id, "images_per_s")
        history.sort(key=lambda m: m.step)
        first_window_s = log_every * cfg.optim.batch_size / history[0].value
        startup = (history[0].timestamp - start_ms) / 1000 - first_window_s
        return [cfg.optim.batch_size / m.value for m in history], startup


VARIANTS = {
    "plain": "plain process",
    "ray": "Ray Train (1 worker)",
    "ray15": "Ray Train, worker at Ray's default niceness 15 (info)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--rounds", type=int, help="paired rounds (default 5, quick 2)")
    parser.add_argument("--quick", action="store_true", help="64 images, 2 epochs, 64 px, 2 rounds")
    parser.add_argument(
        "--with-default-priority",
        action="store_true",
        help="also run the Ray side with the worker at Ray's default niceness 15 (info row)",
    )
    parser.add_argument("--record", help="append the table to this Markdown file")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.image_size = 64, 2, 64
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    cores = torch.get_num_threads()
    machine = machine_lines("cpu")
    print("\n".join(machine))
    cfg = method(args.epochs, args.image_size)

    variants = ["plain", "ray"] + (["ray15"] if args.with_default_priority else [])
    step_ms: dict[str, list[float]] = {v: [] for v in variants}
    startup_s: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        # Rotate the order, so a slow drift of a shared machine favours no variant.
        for name in variants[r % len(variants) :] + variants[: r % len(variants)]:
            if name == "plain":
                windows = plain_run(cfg, args.images, args.log_every)
            else:
                niceness = "15" if name == "ray15" else "0"
                windows, startup = ray_run(cfg, args.images, args.log_every, cores, niceness)
                startup_s[name].append(startup)
            step_ms[name].append(statistics.median(windows[1:]) * 1000)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(
                f"{name} {step_ms[name][-1]:.1f} ms"
                + (
                    f" ({(step_ms[name][-1] / step_ms['plain'][-1] - 1) * 100:+.1f}%)"
                    if name != "plain"
                    else ""
                )
                for name in variants
            ),
            flush=True,
        )

    def spread(values: list[float]) -> str:
        q1, _, q3 = quartiles(values)
        return f"{q1:.1f}-{q3:.1f}"

    rows = [
        [
            VARIANTS["plain"],
            f"{statistics.median(step_ms['plain']):.1f}",
            spread(step_ms["plain"]),
            "-",
            "-",
            "baseline",
            "baseline",
        ]
    ]
    verdicts = {}
    for name in variants[1:]:
        # Paired: the ratio to the plain loop of the same round.
        ratios = [a / b for a, b in zip(step_ms[name], step_ms["plain"], strict=True)]
        q1, ratio, q3 = quartiles(ratios)
        if name == "ray15":
            verdict = target = "info"
        else:
            target = "<= +10%"
            verdict = "PASS" if ratio <= 1.10 else "PASS (within noise)" if q1 <= 1.10 else "FAIL"
        verdicts[name] = verdict
        rows.append(
            [
                VARIANTS[name],
                f"{statistics.median(step_ms[name]):.1f}",
                spread(step_ms[name]),
                f"{(ratio - 1) * 100:+.1f}% ({(q1 - 1) * 100:+.1f}% to {(q3 - 1) * 100:+.1f}%)",
                f"{statistics.median(startup_s[name]):.1f}",
                target,
                verdict,
            ]
        )
    table = markdown_table(
        rows,
        [
            "variant",
            "step ms (median)",
            "step ms p25-p75",
            "per-step overhead, median (p25 to p75)",
            "start-up s (median)",
            "target",
            "result",
        ],
        pad=True,
    )
    per_round = "; ".join(
        f"{name}: "
        + ", ".join(
            f"{(a / b - 1) * 100:+.1f}%"
            for a, b in zip(step_ms[name], step_ms["plain"], strict=True)
        )
        for name in variants[1:]
    )
    notes = (
        f"\n- resnet18 at {args.image_size} px, batch 16, K=256, {args.images} bundled images, "
        f"{args.epochs} epochs; step time = median over throughput windows of {args.log_every} "
        "steps, first window excluded\n"
        f"- {args.rounds} rounds, each running every variant back to back (order rotating; each "
        f"Ray variant on a fresh Ray instance, the plain loop with none running); overhead = "
        f"ratio to the plain loop of the same round, per round: {per_round}\n"
        "- Ray: local instance, one worker with all cores, checkpoint every epoch to a local "
        "folder, metrics to a local MLflow store; start-up = call to first training step "
        "(ray.init included)\n"
        "- PASS: median overhead <= 10%; PASS (within noise): lower quartile <= 10%; FAIL: "
        "even the lower quartile above 10%\n"
    )
    print("\n" + table + notes)
    print(f"overall: {verdicts['ray']}")
    if args.record:
        record(
            args.record,
            f"ray_overhead ({'quick' if args.quick else 'default'}, cpu)",
            machine,
            table + notes + f"\noverall: **{verdicts['ray']}**\n",
        )


if __name__ == "__main__":
    main()
