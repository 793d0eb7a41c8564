"""The entry points as a user runs them: a separate driver process, killable like on a cluster.

`Driver` starts `python pipelines/…` in its own process
group, with its own Ray temp root (`RAY_TMPDIR`, so a test can read every file of the Ray
session it starts), its own log folder, and stdout/stderr in a file. `kill()` sends SIGKILL to
the driver process only, as a crash or an OOM killer would; the local Ray instance it started
dies with it (Ray's processes share the driver's fate). `stop()` ends whatever is left of the
process group the test started, and nothing else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = str(ROOT / "pipelines" / "pretrain_and_eval.py")
ABLATE = str(ROOT / "pipelines" / "ablate.py")
PRETRAIN = str(ROOT / "pipelines" / "pretrain.py")


def main_of(script: str) -> Callable[[list[str]], int]:
    """The `main` of a pipelines/ script, to call in-process as its command line does."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# The project's console lines: stage events, progress, the summary table, errors.
PROJECT_LINE = re.compile(
    r"^(\[(pipeline|sweep|trial [^\]]+|pretrain [^\]]+|(convert|detection|spatial|correspondence|probe|object_probe)/"
    r"[^\]]+)\] |\|[ -]|error: )"
)


def ray_tmpdir() -> str:
    """A short temp root: Ray's Unix socket paths must stay under ~100 characters."""
    return tempfile.mkdtemp(prefix="rayt")


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    def __init__(
        self,
        args: list[str],
        out: Path,
        env: dict[str, str] | None = None,
        ray_tmp: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.out = out
        self.ray_tmp = ray_tmp or ray_tmpdir()
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {
            **inherited,
            "RAY_TMPDIR": self.ray_tmp,
            "DUPR_LOG_DIR": str(out.parent / "logs"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with open(out, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                env=self.env,
                cwd=cwd or out.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # As from a terminal: a shell without job control starts background commands
                # (pytest among them) with SIGINT ignored, and Python then keeps it ignored.
                preexec_fn=_sigint_default,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"driver still running after {timeout:.0f}s:\n{self.output()[-4000:]}"
            ) from None

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll until `condition()`; returns the seconds waited. Fails if the driver exits first."""
        start = time.monotonic()
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"driver exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.output()[-4000:]}"
                )
            if time.monotonic() - start > timeout:
                self.stop()
                raise AssertionError(f"no {what} after {timeout:.0f}s:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        return time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL to the driver alone, as a crash would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def kill_task(self, name: str) -> int:
        """SIGKILL to the Ray worker that runs the task `name` (its process title is
        `ray::<name>`) among this driver's processes, as a lost node or the kernel's OOM
        killer would; its pid. Only processes of the session this test started are looked at."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                if os.getsid(int(entry.name)) == self.proc.pid and title.startswith(f"ray::{name}"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    return int(entry.name)
        raise AssertionError(f"no Ray worker runs {name!r}:\n{self.output()[-4000:]}")

    def interrupt(self, timeout: float = 120) -> int:
        """Ctrl-C in the driver's terminal: SIGINT to its foreground process group (the driver
        and the local Ray instance it started); its exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait(timeout)

    def stop(self) -> None:
        """End what is left of the process group this test started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def run(args: list[str], out: Path, timeout: float = 600, **kwargs) -> tuple[int, str]:
    """Run an entry point to its end; its exit status and output."""
    driver = Driver(args, out, **kwargs)
    try:
        status = driver.wait(timeout)
    finally:
        driver.stop()
    return status, driver.output()


def files_under(root: str | Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()]


def files_holding(files: list[Path], *secrets: str) -> list[str]:
    """`path: secret…` for each file that holds one of `secrets`. A file that a live service
    removed between the listing and the read (PostgreSQL rewrites `pg_internal.init` that way)
    is no longer on disk to hold anything, so it is skipped rather than failing the scan."""
    found = []
    for path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        found += [f"{path}: {s[:8]}..." for s in secrets if s.encode() in data]
    return found
