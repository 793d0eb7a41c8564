"""After a crash: which MLflow runs belong to a driver that died, and closing them.

A pipeline or sweep driver can die without a word (`kill -9`, a lost head node, the SIGKILL
that follows `ray job stop`), leaving its MLflow runs RUNNING forever. Every driver therefore
marks the run it owns with who it is (`dupr.driver`: host, pid and the process's start time)
and keeps a heartbeat tag fresh while it lives. When the same command starts again, it looks
for RUNNING runs of the same pipeline whose driver is gone, and ends them, and their RUNNING
children, as KILLED with `dupr.continued_by` naming the run that carries on their work.

Two kinds of run meet different ends. A run keyed by its content (a pre-training, a sweep, a
trial: the same name means the same work) is continued in place by the next invocation, which
finds it by name, sets it RUNNING again and removes the `dupr.continued_by` and `dupr.error`
tags that no longer hold (`RunLogger.start`). A run that belongs to one invocation (a
pipeline's parent run, a stage run) stays KILLED; the new invocation opens its own.

A driver counts as dead when it ran on this host and its process is gone (or the pid now
belongs to another process), or, on another host, when its heartbeat is older than
`STALE_AFTER_S`. Work is not lost either way: stages are cached by key and pre-training
resumes from its latest checkpoint (see `dupr_platform.stages`, `dupr_platform.ray_pretrain`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from mlflow.tracking import MlflowClient

from dupr_platform.storage import scrub_secrets
from dupr_platform.tracking import CONTINUED_BY_TAG, PARENT_TAG, RunLogger, unreachable_reason

_log = logging.getLogger(__name__)

DRIVER_TAG = "dupr.driver"
HEARTBEAT_TAG = "dupr.heartbeat"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S


def _process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot (Linux), "" elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def driver_identity(pid: int | None = None) -> str:
    """`host:pid:start`: names this process; a reused pid has another start time."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def driver_is_gone(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the driver that tagged a run has died (see the module docstring)."""
    host, _, rest = tags.get(DRIVER_TAG, "").partition(":")
    pid_text, _, start = rest.partition(":")
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        return bool(start) and _process_start(pid) != start
    try:
        beat = float(tags.get(HEARTBEAT_TAG, "0"))
    except ValueError:
        beat = 0.0
    return (time.time() if now is None else now) - beat > STALE_AFTER_S


class Heartbeat:
    """Tags `run` as owned by this process and refreshes its heartbeat until `stop`."""

    def __init__(self, run: RunLogger, where: str, interval_s: float = HEARTBEAT_S) -> None:
        self.client, self.run_id, self.interval_s = run.client, run.run_id, interval_s
        self.where, self.shown = where, scrub_secrets(run.tracking_uri)  # the console's words
        self._stop = threading.Event()
        self._beat()
        self.client.set_tag(self.run_id, DRIVER_TAG, driver_identity())
        self._thread = threading.Thread(target=self._loop, name="dupr-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")

    def _loop(self) -> None:
        down = False
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception as exc:  # a missed beat is not worth a crash
                _log.debug("heartbeat of run %s failed", self.run_id, exc_info=True)
                if not down:  # said once an outage: the trainings go on meanwhile
                    print(
                        f"[{self.where}] tracking {self.shown}: unreachable "
                        f"({unreachable_reason(exc)}); training goes on, its metrics are "
                        "kept until the server is back",
                        flush=True,
                    )
                down = True
                continue
            if down:
                print(f"[{self.where}] tracking {self.shown}: reachable again", flush=True)
            down = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _search(
    client: MlflowClient, experiment_id: str, statuses: tuple[str, ...], filter_string: str
) -> list[Any]:
    """Runs in one of `statuses` that match `filter_string` (MLflow's search has no IN for
    statuses: one query each)."""
    return [
        run
        for status in statuses
        for run in client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = '{status}' and {filter_string}",
            max_results=1000,
        )
    ]


def close_orphans(run: RunLogger, pipeline_tag: str, name: str) -> list[str]:
    """End the runs an earlier invocation of the same pipeline left behind; their ids.

    `pipeline_tag = name` identifies the pipeline's runs. A RUNNING one whose driver is gone
    is ended KILLED with its RUNNING children. Runs that ended without completing (KILLED by
    SIGTERM, FAILED) and their unfinished children are tagged too: `dupr.continued_by` =
    `run`'s id names the run that carries on their work. When `run` itself continues an
    earlier run (a sweep trial, a sweep), its own RUNNING children are from the attempt that
    died and are ended as well.
    """
    client, quote = run.client, "'" if "'" not in name else '"'
    mine = f"tags.`{pipeline_tag}` = {quote}{name}{quote}"
    earlier = [
        r
        for r in _search(client, run.experiment_id, ("RUNNING", "KILLED", "FAILED"), mine)
        if r.info.run_id != run.run_id
        and CONTINUED_BY_TAG not in r.data.tags
        and (r.info.status != "RUNNING" or driver_is_gone(r.data.tags))
    ]
    parents = [(r.info.run_id, r.info.status) for r in earlier]
    if run.resumed:
        parents.append((run.run_id, "FINISHED"))  # its RUNNING children are orphans
    unfinished = ("RUNNING",) if run.resumed else ("RUNNING", "KILLED", "FAILED")
    closed: list[str] = []
    for parent, status in parents:
        for child in _search(
            client, run.experiment_id, unfinished, f"tags.`{PARENT_TAG}` = '{parent}'"
        ):
            if CONTINUED_BY_TAG not in child.data.tags or child.info.status == "RUNNING":
                _close(client, child.info.run_id, child.info.status, run.run_id)
                closed.append(child.info.run_id)
        if parent != run.run_id:
            _close(client, parent, status, run.run_id)
            closed.append(parent)
    if closed:
        _log.info("carried on from %d earlier run(s): %s", len(closed), ", ".join(closed))
    return closed


def _close(client: MlflowClient, run_id: str, status: str, continued_by: str) -> None:
    client.set_tag(run_id, CONTINUED_BY_TAG, continued_by)
    if status == "RUNNING":  # its driver is gone
        client.set_terminated(run_id, status="KILLED")


@contextlib.contextmanager
def driving(run: RunLogger, pipeline_tag: str, name: str, where: str) -> Iterator[None]:
    """While this driver owns `run`: a heartbeat, the runs of a dead predecessor closed
    first, and on an exception the run ended FAILED (KILLED after Ctrl-C or SIGTERM)."""
    heartbeat = Heartbeat(run, where)
    try:
        closed = close_orphans(run, pipeline_tag, name)
        if closed:
            print(
                f"[{where}] continuing the work of an earlier run of this command: "
                f"{len(closed)} MLflow run(s) tagged {CONTINUED_BY_TAG}={run.run_id}",
                flush=True,
            )
        yield
    except BaseException as exc:
        heartbeat.stop()
        run.abandon("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    heartbeat.stop()
