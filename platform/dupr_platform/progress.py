"""Console progress lines for long stages: where it is, how fast, how long is left.

Stages run in Ray tasks and Ray Train workers. Ray forwards their stdout to the driver's
console, so a line written to stdout here is what the user sees while a pipeline runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Prints `[stage] unit done/total (pct) · rate · metrics · left ETA`, at most every
    `every_s` seconds and always for the last step."""

    def __init__(
        self, stage: str, total: int, unit: str = "step", every_s: float = 10.0, done: int = 0
    ) -> None:
        """`done`: units finished before this process started (a resumed run)."""
        self.stage, self.total, self.unit, self.every_s = stage, max(total, 1), unit, every_s
        self.start = time.monotonic()
        self.done_before = done
        self._last_print: float | None = None  # the first update is always printed

    def line(self, done: int, metrics: Mapping[str, float] | None = None) -> str:
        elapsed = time.monotonic() - self.start
        rate = (done - self.done_before) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        parts = [
            f"[{self.stage}] {self.unit} {done}/{self.total} ({100 * done / self.total:.0f}%)",
            f"{rate:.2f} {self.unit}/s",
        ]
        parts += [f"{k} {v:.4g}" for k, v in (metrics or {}).items()]
        parts.append(f"{format_duration(left) if left == left else '?'} left")
        return " · ".join(parts)

    def update(self, done: int, metrics: Mapping[str, float] | None = None) -> None:
        now = time.monotonic()
        recent = self._last_print is not None and now - self._last_print < self.every_s
        if done < self.total and recent:
            return
        self._last_print = now
        # Not `print`: Ray Train workers replace it with one that logs the line and also echoes
        # it to stdout, so every line reached the console twice.
        sys.stdout.write(self.line(done, metrics) + "\n")
        sys.stdout.flush()
