"""Plain single-process DUPR pre-training, in the style of torchvision's reference scripts.

    python -m dupr.local_pretrain --method cpu_demo --output-dir runs/demo
    python -m dupr.local_pretrain --method dupr --data /path/to/images --epochs 200 --workers 16

It runs on one device without Ray or MLflow, writes ``config.json``, ``metrics.jsonl`` and an
atomically replaced ``checkpoint.pt`` after each epoch into the output folder, and continues from
that checkpoint when started again with the same folder. The distributed launcher in the
platform drives the same `dupr.train` loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from dupr.config import ConfigError, DUPRConfig, preset, validate
from dupr.data import ImageFolderDataset, bundled_image_folder
from dupr.data.two_views import build_loader
from dupr.io import write_atomically
from dupr.model import DUPR
from dupr.train import TrainState, build_state, compile_model, train
from dupr.views import TwoViews

log = logging.getLogger("dupr.local_pretrain")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(
    cfg: DUPRConfig,
    output_dir: Path,
    data: Path | None = None,
    device: str = "auto",
    workers: int = 2,
    log_every: int = 10,
) -> TrainState:
    validate(cfg)
    images = ImageFolderDataset(data if data is not None else bundled_image_folder())
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dev = pick_device(device)
    loader = build_loader(
        images,
        TwoViews(cfg.model.image_size, cfg.augment),
        cfg.optim.batch_size,
        seed=cfg.seed,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    model = DUPR(cfg.model).to(dev)
    if cfg.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.optim.compile:
        compile_model(model)
    state = build_state(model, cfg.optim, len(loader), dev)
    checkpoint = output_dir / "checkpoint.pt"
    if checkpoint.exists():
        state.load_state_dict(torch.load(checkpoint, map_location=dev, weights_only=False))
        log.info("resumed from %s at epoch %d, step %d", checkpoint, state.epoch, state.step)
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    metrics_file = (output_dir / "metrics.jsonl").open("a")

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        metrics_file.flush()
        log.info(
            "epoch %.2f step %d loss %.4f lr %.4f %.1f img/s",
            metrics["epoch"],
            step,
            metrics["loss"],
            metrics["lr"],
            metrics["images_per_s"],
        )

    def on_epoch_end(s: TrainState) -> None:
        # A crash never leaves a half-written checkpoint.
        write_atomically(checkpoint, lambda f: torch.save(s.state_dict(), f), fsync=False)
        log.info("epoch %d done, checkpoint %s", s.epoch, checkpoint)

    log.info(
        "pre-training %s on %d images (%s), %d steps/epoch, device %s",
        cfg.model.backbone,
        len(images),
        images.root,
        len(loader),
        dev,
    )
    try:
        train(
            state,
            loader,
            cfg.optim,
            dev,
            log_every=log_every,
            on_log=on_log,
            on_epoch_end=on_epoch_end,
        )
    finally:
        metrics_file.close()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method", default="cpu_demo", help="method preset: dupr, dupr_ablation, mocov2, cpu_demo"
    )
    parser.add_argument("--data", type=Path, help="image folder (default: the bundled photo set)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/pretrain"))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = preset(args.method)
        for field, value in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
        ):
            if value is not None:
                setattr(cfg.optim, field, value)
        validate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = time.time()
    try:
        state = run(cfg, args.output_dir, args.data, args.device, args.workers, args.log_every)
    except (FileNotFoundError, NotADirectoryError) as err:  # a bad --data folder
        print(f"error: --data: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:  # e.g. a batch larger than the data set
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output_dir.resolve()
    print(
        f"\npre-training finished: {state.epoch} epochs, {state.step} steps in {time.time() - start:.0f} s"
    )
    print(f"  checkpoint: {out / 'checkpoint.pt'}")
    print(f"  metrics:    {out / 'metrics.jsonl'}")
    print(f"  config:     {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
