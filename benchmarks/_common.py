"""Shared helpers for the benchmark scripts: machine description, recording, test images.

Every benchmark prints the machine it ran on and can append its table to a results file, so a
number in `RESULTS.md` is never separated from the hardware and software that produced it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from dupr.data.bundled import bundled_photos
from dupr_platform.software import cpu_model, usable_cores

# ImageNet's typical image sizes (width, height).
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (400, 400))


def machine_lines(device: str) -> list[str]:
    """One line per fact about the machine and software, for the console and the record."""
    lines = [
        f"CPU: {cpu_model()}, {usable_cores()} usable cores (os.cpu_count()={os.cpu_count()})",
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"GPU: {names} (CUDA {torch.version.cuda})")
    else:
        lines.append("GPU: none (CUDA not available)")
    lines.append(f"benchmark device: {device}")
    return lines


def fill_sizes(args: object, quick: bool, defaults: dict, quick_sizes: dict) -> None:
    """Give every size option left unset its default (or its --quick value); explicit ones win."""
    for name, value in (quick_sizes if quick else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when available, else CPU; an explicit CUDA request must be satisfiable."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); the spread reported next to a median."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def now_string() -> str:
    """Local date and time with the time zone, as recorded next to each result."""
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def record(path: str | os.PathLike[str], title: str, machine: list[str], body: str) -> None:
    """Append one result section (title, date, command, machine, body) to a Markdown file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = not target.exists() or target.stat().st_size == 0
    command = shlex.join(["python", *sys.argv])
    with open(target, "a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmark results\n\nSections are appended by `--record`; newest last.\n")
        f.write(f"\n## {title}\n\n")
        f.write(f"- date: {now_string()}\n- command: `{command}`\n")
        for line in machine:
            f.write(f"- {line}\n")
        f.write(f"\n{body.rstrip()}\n")
    print(f"\nrecorded to {target}")


def add_model_arguments(parser: argparse.ArgumentParser, batch: bool = True) -> None:
    """The paper's setting, which the GPU benchmarks share (their --quick shrinks it)."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    if batch:
        parser.add_argument("--batch", type=int, default=64, help="per-GPU batch")
    parser.add_argument("--queue", type=int, default=65536, help="K, keys per memory bank")


def report(
    args: argparse.Namespace,
    name: str,
    device: torch.device,
    machine: list[str],
    table: str,
    notes: list[str],
    detail: str = "",
) -> None:
    """Print a benchmark's table and notes; with --record, append them to the results file
    under "name (quick or default, device[; detail])"."""
    body = table + "\n" + "".join(f"- {line}\n" for line in notes)
    print("\n" + body)
    if args.record:
        title = f"{name} ({'quick' if args.quick else 'default'}, {device}{detail})"
        record(args.record, title, machine, body)


def _write_images(root: Path, first: int, stop: int, seed: int) -> int:
    photos = [image for _, image in bundled_photos()]
    total = 0
    for i in range(first, stop):
        rng = random.Random(f"{seed}-{i}")  # per image, so any split over processes agrees
        photo = photos[i % len(photos)]
        width, height = rng.choice(IMAGENET_SIZES)
        scale = rng.uniform(0.35, 1.0)
        crop_w = max(32, int(photo.width * scale))
        crop_h = max(32, min(photo.height, int(crop_w * height / width)))
        left = rng.randint(0, photo.width - crop_w)
        top = rng.randint(0, photo.height - crop_h)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        # Sensor-like noise: upscaled crops are smoother than photos and would compress (and
        # decode) unrealistically well; with it files are about ImageNet's ~110 KB average.
        noise = np.random.default_rng(seed + i).normal(0, 16, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        path = root / f"n{i % 100:08d}" / f"img_{i:07d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=92)
        total += path.stat().st_size
    return total


def build_folder(root: Path, count: int, seed: int, processes: int = 1) -> int:
    """`count` ImageNet-like JPEGs in 100 class folders, built offline from the bundled photos
    (random crops, flips, brightness and noise, at ImageNet's sizes; quality 92, ~95 KB each
    where ImageNet's average is ~110 KB); returns their total size in bytes."""
    if processes <= 1:
        return _write_images(root, 0, count, seed)
    bounds = [round(count * p / processes) for p in range(processes + 1)]
    spans = [(root, a, b, seed) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.starmap(_write_images, spans))
