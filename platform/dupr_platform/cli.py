"""The frame of every entry point: console, signals, errors and exit codes.

    pipelines/pretrain_and_eval.py, pipelines/ablate.py, pipelines/pretrain.py

Exit status: 0 when everything finished, 1 when something failed at run time (one line says
what; the rest of a pipeline or sweep still ran), 2 for bad input found before anything
started, 130 after Ctrl-C and 143 after SIGTERM (`ray job stop`), when the runs are marked
KILLED. No user error prints a traceback; an unexpected failure prints one line and leaves its
traceback in the log file (`dupr_platform.console`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from dupr.config import ConfigError
from dupr.convert import ConversionError
from dupr.data.coco import CocoFormatError
from dupr_platform import console
from dupr_platform.cluster import stop_ray
from dupr_platform.failures import UnrecoverableError
from dupr_platform.shards import ShardError
from dupr_platform.storage import StorageError, scrub_secrets
from dupr_platform.tracking import TrackingError

_log = logging.getLogger(__name__)

# Bad input found before any stage ran: one line on stderr, exit status 2.
INPUT_ERRORS = (
    ConfigError,
    ConversionError,
    CocoFormatError,
    StorageError,
    TrackingError,
    ShardError,
    FileNotFoundError,
    NotADirectoryError,
)


class _RayStopper:
    def close(self) -> None:
        stop_ray()  # the instance this command started (a process that ends stops it anyway)


_terminated = False  # SIGTERM arrived: the KeyboardInterrupt in flight is its, not Ctrl-C's


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (`ray job stop`, a scheduler): unwind as Ctrl-C does, ending the runs as KILLED.

    A KeyboardInterrupt, because it is the one exception that Ray's blocking calls (`ray.get`
    inside Ray Train's and Tune's loops) pass on from a signal handler: any other came out of
    them as a SystemError, which Ray Train took for a failed run (exit status 1, runs FAILED).
    """
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def exit_process(status: int) -> NoReturn:
    """End the command with `status`, without the garbage collector's passes at shutdown.

    Every object of the command (torch's, Ray's, MLflow's modules among them) lives until the
    interpreter tears down, and the collector's passes over them took 1-2 s of each
    command's exit on 2 CPU cores. `gc.freeze` puts them out of its reach; atexit handlers,
    logging's shutdown and reference counting still run, so runs and files still close.
    Only for a process that ends here: a test calling `main` keeps its collector.
    """
    gc.freeze()
    sys.exit(status)


def error(message: str) -> None:
    print(f"error: {scrub_secrets(' '.join(str(message).split()))}", file=sys.stderr, flush=True)


def asked_for_help(argv: list[str], usage: str | None) -> bool:
    """`-h` or `--help`: print the entry point's usage (its docstring) and say so.

    The commands take Hydra overrides, not options: without this, Hydra's parser called
    `--help` a bad override (exit status 2).
    """
    if not {"-h", "--help"} & set(argv):
        return False
    print((usage or "").strip())
    print("\nOverrides are key=value (Hydra's syntax) on the config named above; see README.md.")
    return True


def run_cli(
    load: Callable[[], Any], run: Callable[[Any], Any], log_name: Callable[[Any], str]
) -> int:
    """Load the config, then run it; map what happens to one line and an exit status.

    `run` returns an object with `ok` (False: something failed at run time, already reported).
    """
    global _terminated
    _terminated = False
    signal.signal(signal.SIGTERM, _terminate)
    # Without Ray's dashboard the Train state-actor reconciliation only logs failures.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    # Ctrl-C is KeyboardInterrupt, caught below. Ray Tune's own SIGINT handler (on by default)
    # stopped a sweep's trials as if they had finished: the table said "stopped early", the
    # exit status was 1 and the trials' MLflow runs stayed RUNNING (ray_pretrain._Trainer does
    # the same for Ray Train's handler).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # MLflow prints two lines ("View run ... at: URL") for each run it ends on a tracking
    # server; the summary table links every stage's run already.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        cfg = load()
    except INPUT_ERRORS as err:
        error(str(err))
        return 2
    with console.session(log_name(cfg)) as log_file, contextlib.closing(_RayStopper()):
        try:
            result = run(cfg)
        except INPUT_ERRORS as err:
            error(str(err))
            return 2
        except UnrecoverableError as err:
            error(str(err))
            return 1
        except KeyboardInterrupt:
            if _terminated:
                error("terminated; the same command resumes")
                return 143
            error("interrupted; the same command resumes")
            return 130
        except Exception as err:  # nobody foresaw it: one line here, the traceback in the log
            if log_file is None:
                raise
            console.record_traceback("unexpected failure")
            error(f"{type(err).__name__}: {err} (traceback in {log_file})")
            return 1
    return 0 if getattr(result, "ok", True) else 1
