"""Shared helpers for the benchmark scripts: machine description, recording.

Every benchmark prints the machine it ran on and can append its table to a results file, so a
number in `RESULTS.md` is never separated from the hardware and software that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch

from dupr_platform.software import cpu_model, usable_cores


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
