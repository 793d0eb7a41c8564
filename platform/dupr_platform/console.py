"""What the user sees: the project's own lines on the console, everything else in a log file.

A pipeline's console is the project's lines: the stages as they start and end, the progress
lines the training workers and stage tasks write to their stdout (`dupr_platform.progress`),
warnings of the project's loggers, the summary and errors. Ray's and MLflow's INFO lines, the
tracebacks Ray logs for errors it recovers from, and the stderr of every worker go to a log file
instead, `runs/logs/<name>-<time>-<pid>.log` (or under `$DUPR_LOG_DIR`), whose path the
pipeline prints once and logs to MLflow. Secret values never reach the file (`scrub_secrets`).

`DUPR_RAY_LOGS=console` leaves everything as Ray prints it.

Worker output reaches the driver through Ray's log monitor, the raylet's error messages (a
worker that died, with Ray's guesses why) through its error listener. Ray has no public hook to
route either: `route_worker_output` swaps the handler of Ray's dispatcher
(`ray._private.ray_logging`, Ray 2.60, pinned in pyproject.toml) and the function the listener
prints with (`ray._private.worker.print_to_stdstream`) for one that prints a worker's stdout
lines without Ray's prefix and deduplication (which would merge progress lines that differ only
in numbers) and writes its stderr, where Ray's and the workers' logging goes, and the raylet's
messages to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dupr_platform.storage import scrub_secrets

RAY_LOGS_ENV = "DUPR_RAY_LOGS"
LOG_DIR_ENV = "DUPR_LOG_DIR"
PROJECT_LOGGERS = ("dupr", "dupr_platform")
QUIETED_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "py.warnings")
WORKERS_LOGGER = "dupr_platform.workers"  # the stderr of Ray's workers, forwarded to the file

_log_path: Path | None = None
_file_handler: logging.Handler | None = None
_announced = False
_console: Any = None  # the stdout of the session: where worker stdout lines are shown


class _ScrubSecrets(logging.Filter):
    """Secret values out of a record's message and traceback (a filter, not a formatter: Ray
    replaces the formatters of the handlers on its logger when it starts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_secrets(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = scrub_secrets(logging.Formatter().formatException(record.exc_info))
        return True


def quiet() -> bool:
    """Whether Ray's own output is kept off the console (the default)."""
    return os.environ.get(RAY_LOGS_ENV, "").lower() not in ("console", "1", "true", "yes")


def log_path() -> Path | None:
    """The log file of this process (None with DUPR_RAY_LOGS=console)."""
    return _log_path


@contextlib.contextmanager
def session(name: str) -> Iterator[Path | None]:
    """Route the process's output for one command (see the module docstring); yields the log
    file's path (created on first use; None with DUPR_RAY_LOGS=console). Python's logging is
    restored afterwards, so a caller in a longer-lived process (a test) gets its own back."""
    global _log_path, _file_handler, _announced, _console
    touched = ["", *PROJECT_LOGGERS, *QUIETED_LOGGERS, WORKERS_LOGGER]
    loggers = [logging.getLogger(n) for n in touched]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    try:
        yield _setup(name)
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
        if _file_handler is not None:
            _file_handler.close()
        _log_path, _file_handler, _announced, _console = None, None, False, None


def _setup(name: str) -> Path | None:
    global _log_path, _file_handler, _console
    _console = sys.stdout
    logging.captureWarnings(True)
    project = logging.StreamHandler(sys.stderr)
    project.setLevel(logging.WARNING)
    project.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    project.addFilter(_ScrubSecrets())
    for name_ in PROJECT_LOGGERS:
        logger = logging.getLogger(name_)
        logger.setLevel(logging.INFO)
        logger.propagate = not quiet()
        if quiet():
            logger.handlers[:] = [project]
    if not quiet():
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        return None
    folder = Path(os.environ.get(LOG_DIR_ENV, "runs/logs")).resolve()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    _log_path = folder / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folder.mkdir(parents=True, exist_ok=True)
    _file_handler = logging.FileHandler(_log_path, delay=True, encoding="utf-8")
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _file_handler.addFilter(_ScrubSecrets())
    root = logging.getLogger()
    root.handlers[:] = [_file_handler]
    root.setLevel(logging.INFO)
    for name_ in PROJECT_LOGGERS:
        logging.getLogger(name_).addHandler(_file_handler)
    quiet_library_loggers()
    return _log_path


def record_traceback(message: str) -> None:
    """The current exception's traceback, into the log file only (not the console)."""
    if _file_handler is not None:
        record = logging.LogRecord(
            "dupr_platform", logging.ERROR, __file__, 0, message, None, sys.exc_info()
        )
        _file_handler.handle(record)


def quiet_library_loggers() -> None:
    """Ray's and MLflow's loggers write to the log file instead of their own console handlers.

    They install those handlers when imported (`import ray.train` imports Ray Data's), so this
    runs again after Ray starts.
    """
    if _file_handler is None:
        return
    for name in QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [_file_handler]
        logger.propagate = False


class _ToLog:
    """A text stream whose lines go to the log file."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                logging.getLogger(WORKERS_LOGGER).info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """What libraries print on the driver's stdout/stderr meanwhile (Ray Tune's tables) goes to
    the log file; the workers' lines still reach the console."""
    if not quiet() or _file_handler is None:
        yield
        return
    with contextlib.redirect_stdout(_ToLog()), contextlib.redirect_stderr(_ToLog()):
        yield


def _console_out() -> Any:
    """The session's console; after the session (a late worker line), stdout."""
    return _console if _console is not None else sys.stdout


def show(text: str) -> None:
    """Print `text` on the session's console, also while `library_output` is in effect (what a
    worker reported, secret values scrubbed as in its forwarded lines)."""
    out = _console_out()
    out.write(scrub_secrets(text) + "\n")
    out.flush()


def announce(where: str) -> None:
    """Print the log file's path, once."""
    global _announced
    if _log_path is not None and not _announced:
        _announced = True
        print(f"[{where}] Ray's own output: {_log_path} ({RAY_LOGS_ENV}=console shows it here)")


def route_worker_output() -> None:
    """After `ray.init`: workers' stdout to the console, their stderr to the log file.

    Only inside a `session` (an entry point); a library caller keeps Ray's own printing."""
    if not quiet() or _file_handler is None:
        return
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher
    from ray._private.worker import filter_autoscaler_events

    quiet_library_loggers()
    forwarded = logging.getLogger(WORKERS_LOGGER)
    forwarded.propagate = False
    forwarded.handlers[:] = [_file_handler] if _file_handler else []
    forwarded.setLevel(logging.INFO)

    def route(data: dict[str, Any]) -> None:
        pid = data.get("pid")
        source = data.get("actor_name") or data.get("task_name") or ""
        shown = not data.get("is_err") and pid not in ("autoscaler", "raylet")
        lines = data.get("lines", [])
        if pid == "autoscaler":  # its events, not the status table it prints every few seconds
            lines = list(filter_autoscaler_events(lines))
        out = _console_out()
        for line in lines:
            if shown:
                out.write(scrub_secrets(line) + "\n")
            else:
                forwarded.info("(%s pid=%s, ip=%s) %s", source, pid, data.get("ip"), line)
        if shown:
            out.flush()

    for name in ("ray_print_logs", "dupr_console"):
        global_worker_stdstream_dispatcher.remove_handler(name)
    global_worker_stdstream_dispatcher.add_handler("dupr_console", route)
    # The raylet's error messages (a worker that died, with Ray's guesses why) do not pass the
    # dispatcher: Ray's error listener thread hands them to this module-level function.
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: route(data)
