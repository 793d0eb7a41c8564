"""The main job's smoke run on this machine, as a user runs it before spending GPU hours.

    python benchmarks/platform_smoke.py --record benchmarks/RESULTS.md

Runs `pipelines/pretrain_and_eval.py preset=<preset> smoke=true` (README, "Smoke run before GPU
hours") on a local Ray instance, its storage and MLflow store in a scratch folder, and records
its smoke table: on a GPU machine this is the platform's own GPU path (Ray Train's GPU worker,
the conversion and every evaluation stage on the GPU, hours from measured step times), which
`gpu_checks.sh` runs as its `platform smoke` step. The pipeline's output streams through;
`--budget-s` interrupts it (Ctrl-C: it ends with its line) so that whatever it printed is still
recorded before an outer time limit would end both.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_lines, record, resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLE_START = "smoke run of "  # the pipeline's smoke table begins with this line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper_r50_imagenet", help="configs/preset/<name>")
    parser.add_argument("--budget-s", type=float, default=270, help="interrupt the run after")
    parser.add_argument("--record", help="append the smoke table to this Markdown file")
    return parser.parse_args(argv)


def smoke_table(lines: list[str]) -> list[str]:
    """The smoke table and its estimate paragraph, from the pipeline's output."""
    starts = [i for i, line in enumerate(lines) if line.startswith(TABLE_START)]
    if not starts:
        return []
    table = lines[starts[-1] :]
    end = next((i for i, line in enumerate(table) if line.startswith("ESTIMATE")), len(table))
    return table[: end + 1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_lines(str(resolve_device("auto")))
    print("\n".join(machine), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="platform-smoke-"))
    command = [
        sys.executable,
        "pipelines/pretrain_and_eval.py",
        f"preset={args.preset}",
        "smoke=true",
        f"storage={scratch / 'storage'}",
        f"tracking_uri=sqlite:///{scratch / 'mlflow.db'}",
    ]
    start = time.monotonic()
    # Its own process group: Ctrl-C goes to the pipeline and the Ray processes it started.
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    timer = threading.Timer(args.budget_s, os.killpg, (proc.pid, signal.SIGINT))
    timer.start()
    # An outer time limit's SIGTERM reaches this process only: pass it on, then record.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(proc.pid, signal.SIGTERM))
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    timer.cancel()
    wall = time.monotonic() - start
    table = smoke_table(lines)
    notes = [
        f"command: `{' '.join(['python', *command[1:4]])}` (storage and MLflow store in a "
        "scratch folder)",
        f"exit status {code} after {wall:.0f} s"
        + (f" (interrupted at --budget-s {args.budget_s:.0f})" if wall >= args.budget_s else ""),
    ]
    body = "\n".join(table or ["(no smoke table; the run's last lines:)", "", *lines[-30:]])
    body += "\n" + "".join(f"- {note}\n" for note in notes)
    print("\n" + "".join(f"- {note}\n" for note in notes), end="")
    if args.record:
        record(args.record, f"platform_smoke ({args.preset})", machine, body)
    return code


if __name__ == "__main__":
    sys.exit(main())
