"""MLflow tracking for training runs: one writer per run, metrics committed with checkpoints.

Why the metrics are buffered: a distributed run may crash and resume from its last checkpoint.
If every step went to MLflow immediately, the steps between that checkpoint and the crash would
be logged twice (once before the crash, once after the resume re-runs them). So the rank-0
:class:`RunLogger` keeps per-step metrics in memory (:meth:`RunLogger.log_metrics`) and the
trainer calls :meth:`RunLogger.commit` when a checkpoint has been persisted (or
:meth:`RunLogger.discard` when it was not). A restarted driver or worker calls
:meth:`RunLogger.start` with the same run name and gets the SAME run id back; the logger then
learns the largest step already recorded per metric and drops buffered steps at or below it.
Together: every step appears in MLflow exactly once, with steps increasing per metric.

``commit`` hands the batch to one background thread (``log_batch``, ≤1000 metrics per call),
so the training loop never waits on the network. A batch is durable once :meth:`flush`
returns; a crash in the short window between ``commit`` and the background send loses those
steps, which is why :meth:`RunLogger.end` flushes and callers that cannot accept that window
call ``flush()`` right after ``commit()``.

Why the sender keeps what it could not send: a tracking server that restarts (an upgrade, a
rescheduled pod) or is down for longer than MLflow's own retries (about 4 minutes per call)
must not end a pre-training of days. The committed metrics stay in order in memory and are
tried again every ``RETRY_S`` until the server answers; :meth:`RunLogger.unsent` lists them,
so that a checkpoint can carry them, and :meth:`RunLogger.resend` queues them again after a
resume. An error the server gives for the request itself (a bad metric name, a deleted run)
is not retried: the batch is dropped and :meth:`flush` raises.

The logger's other calls (opening the run, params, tags, artifacts, ending it) wait for such a
server as well, for up to ``PATIENCE_S`` beyond MLflow's retries (:func:`patiently`), so that a
driver launching a stage or a worker restarting during an outage carries on once it is over.
On the way out after a failure or an interrupt, :meth:`RunLogger.abandon` does not wait.

Secrets never reach MLflow: params, tags and logged dicts/texts go through :func:`redact`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import filelock
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dupr_platform.environment import environment
from dupr_platform.storage import (
    REDACTED,
    contains_secret,
    mask_userinfo,
    scrub_secrets,
    secret_env_values,
)
from dupr_platform.text import one_line

__all__ = [
    "ERROR_TAG",
    "REDACTED",
    "RUN_KEY_TAG",
    "RunGone",
    "RunLogger",
    "TrackingError",
    "absolute_tracking_uri",
    "check_tracking",
    "flatten_params",
    "metric_rows",
    "metrics_from_rows",
    "mlflow_client",
    "patient_client",
    "patiently",
    "redact",
    "redact_tree",
    "unreachable_reason",
]

_log = logging.getLogger(__name__)

RUN_KEY_TAG = "dupr.run_key"
PARENT_TAG = "mlflow.parentRunId"
PREVIOUS_PARENT_TAG = "dupr.previous_parent_run"
CONTINUED_BY_TAG = "dupr.continued_by"  # on a run a crashed driver left: who carried on
ERROR_TAG = "dupr.error"  # the one-line reason a run FAILED
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
RETRY_S = 10.0  # between tries of a batch that the tracking server could not take
SEND_WAIT_S = 30.0  # at a checkpoint, for the metrics up to it to reach the server
# How long a logger's calls wait for a tracking server that cannot be reached (a restart, a
# maintenance) before they fail; a training's rerun sends what its last checkpoint carries.
PATIENCE_S = 15 * 60.0
# MLflow's error codes for a request the server understood and refused: retrying cannot help.
REFUSED = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "MALFORMED_REQUEST",
        "PERMISSION_DENIED",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "UNAUTHENTICATED",
    }
)
# What a call to a server that cannot be reached raises once MLflow's retries are spent (or
# its HTTP client, for an artifact): worth trying again later, unlike other errors.
_UNREACHABLE = (
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The credential variables of an MLflow server (names only ever shown, never values).
TRACKING_CREDENTIALS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "access_key",
    "accesskey",
    "credential",
    "api_key",
    "apikey",
    "private_key",
)
_CHECK_TIMEOUT_S = 5
_ENV_LOCK = threading.Lock()
T = TypeVar("T")


class TrackingError(ValueError):
    """A tracking URI, server or run problem, phrased as one line for the user."""


class RunGone(TrackingError):
    """The run to continue is deleted, or the tracking server has no such run."""


# ---------------------------------------------------------------------------------------------
# Params and redaction


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"model.alpha": "0.5"}``; lists and tuples become their ``str``."""
    return {k: str(v) for k, v in _flatten(d, prefix).items()}


def _is_secret_key(key: str) -> bool:
    norm = key.lower().replace("-", "_")
    return any(part in norm for part in _SECRET_KEY_PARTS)


def _redact_value(value: str, secrets: list[str]) -> str:
    return REDACTED if contains_secret(value, secrets) else mask_userinfo(value)


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Mask values that are or contain secrets: by key name, by env secret value, URI password.

    A URI with ``user:password@`` keeps its shape with only the password masked.
    """
    secrets = secret_env_values()
    return {
        k: REDACTED if _is_secret_key(k) else _redact_value(str(v), secrets)
        for k, v in params.items()
    }


def redact_tree(obj: Any) -> Any:
    """:func:`redact` for nested dicts/lists (configs logged as artifacts)."""
    secrets = secret_env_values()

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: REDACTED if _is_secret_key(str(k)) else walk(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return _redact_value(x, secrets)
        return x

    return walk(obj)


# Tracking errors become MLflow tags and console lines: short ones.
_one_line = functools.partial(one_line, limit=300, cut_mark="...")


def unreachable_reason(exc: BaseException) -> str:
    """Why a call to the tracking server failed, short: the socket's error where MLflow's
    message wraps one in its URL and urllib3's retry report, else the message's line."""
    message = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^\"'()]+", message)
    if errno:
        return errno.group(0).strip()
    if "timed out" in message.lower():
        return "no answer (timed out)"
    return _one_line(exc)


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------------------------
# Preflight


def check_tracking(uri: str) -> None:
    """Preflight: the tracking store answers (HTTP) or its folder is writable (sqlite).

    Fails within seconds with a one-line :class:`TrackingError` naming the URI.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise TrackingError(f"tracking {uri!r}: empty URI (use http(s)://host:port or sqlite:///…)")
    uri = uri.strip()
    shown = scrub_secrets(uri)
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        _check_http(uri, shown)
    elif scheme == "sqlite":
        _check_sqlite(uri, shown)
    elif scheme in ("postgresql", "mysql", "mssql") or scheme.startswith(
        ("postgresql+", "mysql+", "mssql+")
    ):
        _check_api(uri, shown)
    elif scheme in ("", "file"):
        raise TrackingError(
            f"tracking {shown!r}: the file store is disabled in MLflow 3 "
            "(use sqlite:///path/mlflow.db or an http(s):// server)"
        )
    else:
        raise TrackingError(
            f"tracking {shown!r}: unsupported scheme {scheme!r} "
            "(use http(s)://, sqlite:/// or postgresql://)"
        )


def _check_http(uri: str, shown: str) -> None:
    parts = urlsplit(uri.rstrip("/"))
    netloc = parts.netloc.rsplit("@", 1)[-1]  # no userinfo in the probe URL
    health = urlunsplit((parts.scheme, netloc, f"{parts.path}/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=_CHECK_TIMEOUT_S) as resp:
            resp.read(64)
    except urllib.error.HTTPError as exc:
        raise TrackingError(f"tracking {shown!r}: GET /health answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            cause = "connection refused"
        elif isinstance(reason, TimeoutError):
            cause = f"no answer within {_CHECK_TIMEOUT_S}s"
        else:
            cause = _one_line(reason if isinstance(reason, BaseException) else exc)
        raise TrackingError(f"tracking {shown!r}: cannot reach the server ({cause})") from None
    _check_api(uri, shown)


def _check_api(uri: str, shown: str) -> None:
    """One cheap API call (also catches auth problems and non-MLflow servers)."""
    try:
        with _fail_fast_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        status = getattr(exc, "get_http_status_code", lambda: None)()
        if status in (401, 403) or "401" in str(exc)[:200]:
            raise TrackingError(
                f"tracking {shown!r}: authentication failed (set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)"
            ) from None
        raise TrackingError(f"tracking {shown!r}: {_one_line(exc)}") from None
    except Exception as exc:  # driver errors, refused connections, bad hosts
        raise TrackingError(f"tracking {shown!r}: {_one_line(exc)}") from None


@contextlib.contextmanager
def _fail_fast_http() -> Iterator[None]:
    """No retries, short timeout, for one MLflow call; the environment is restored after."""
    overrides = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(_CHECK_TIMEOUT_S),
    }
    with _ENV_LOCK, environment(overrides):
        yield


def _check_sqlite(uri: str, shown: str) -> None:
    database = sqlite_database(uri)
    if database is None or uri == SQLITE:
        raise TrackingError(
            f"tracking {shown!r}: expected sqlite:///relative.db or sqlite:////abs.db"
        )
    folder = os.path.dirname(database)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        cause = exc.strerror or _one_line(exc)
        raise TrackingError(
            f"tracking {shown!r}: folder {folder!r} is not writable ({cause})"
        ) from None


# ---------------------------------------------------------------------------------------------
# Run logger


class RunLogger:
    """The rank-0 writer of one MLflow run; see the module docstring for the commit protocol."""

    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        run_id: str,
        experiment_id: str,
        resumed: bool,
        floors: Mapping[str, int],
        patience_s: float = PATIENCE_S,
    ) -> None:
        # MLflow's client whose every call waits out an unreachable server (`patiently`): the
        # logger's own calls, and its users' beyond the logger's methods.
        self.patient_client = _Patient(client, patience_s)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.resumed = resumed
        self._shown = scrub_secrets(tracking_uri)
        self._floors: dict[str, int] = dict(floors)  # largest step recorded per metric
        self._buffer: dict[tuple[str, int], Metric] = {}
        self._errors: list[str] = []  # refused batches, raised by flush()
        self._ended = False
        # Committed and not yet taken by the server, in order; the sender's state. All under
        # `_sending`, which the sender notifies when a batch went through or failed.
        self._sending = threading.Condition()
        self._unsent: list[Metric] = []
        self._unreachable = ""  # why the last try failed, while the server cannot be reached
        self._closed = False
        self._thread = threading.Thread(
            target=self._send_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True
        )
        self._thread.start()

    @property
    def client(self) -> MlflowClient:
        """MLflow's client of the run: a call fails once MLflow's own retries are spent."""
        return self.patient_client.client

    @client.setter
    def client(self, client: MlflowClient) -> None:
        self.patient_client.client = client

    @property
    def patience_s(self) -> float:
        """How long the logger's calls wait for a tracking server that cannot be reached."""
        return self.patient_client.patience_s

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        stale_tags: Iterable[str] = (),
        patience_s: float | None = None,
        starts_over: bool = False,
    ) -> RunLogger:
        """Continue ``run_id``, else the live run tagged ``dupr.run_key == run_name``, else create.

        A restarted driver or worker passing the same ``run_name`` resumes the same run id.
        A continued run loses ``stale_tags`` (the caller's tags that describe one invocation).
        ``starts_over``: the caller computes from its first step again (no checkpoint), so a
        found run that holds metrics is an earlier attempt's and is left as it is: a new run.
        ``patience_s`` (default ``PATIENCE_S``): how long this and the logger's later calls
        wait for a tracking server that cannot be reached.
        """
        shown = scrub_secrets(tracking_uri)
        patience_s = PATIENCE_S if patience_s is None else patience_s
        client = _Patient(mlflow_client(tracking_uri), patience_s)
        try:
            resumed = True
            if run_id:
                run = _get_live_run(client, run_id, shown)
            else:
                exp_id = _experiment_id(
                    client, experiment, shown, local_artifacts(tracking_uri, experiment)
                )
                run = _find_run(client, exp_id, run_name, shown)
                if run is not None and starts_over and run.data.metrics:
                    _log.info(
                        "tracking %s: run %s (%s) holds an earlier attempt's metrics; "
                        "starting a new run",
                        shown,
                        run.info.run_id,
                        run_name,
                    )
                    run = None
                if run is None:
                    new_tags = {RUN_KEY_TAG: run_name}
                    if parent_run_id:
                        new_tags[PARENT_TAG] = parent_run_id
                    run = client.create_run(exp_id, tags=new_tags, run_name=run_name)
                    resumed = False
            rid = run.info.run_id
            if resumed:
                client.update_run(rid, status="RUNNING")
                # Alive again: what a crash cleanup or an earlier failure wrote no longer holds.
                for stale in (CONTINUED_BY_TAG, ERROR_TAG, *stale_tags):
                    if stale in run.data.tags:
                        client.delete_tag(rid, stale)
            extra = redact(dict(tags or {}))
            if parent_run_id and resumed:
                # A continued run moves under the parent of the invocation that continues it.
                previous = run.data.tags.get(PARENT_TAG)
                extra[PARENT_TAG] = parent_run_id
                if previous and previous != parent_run_id:
                    extra[PREVIOUS_PARENT_TAG] = previous
            for chunk in _chunks([RunTag(k, v) for k, v in extra.items()], MAX_TAGS_PER_BATCH):
                client.log_batch(rid, tags=chunk, synchronous=True)
            floors = {
                key: max(m.step for m in history)
                for key in (run.data.metrics if resumed else {})
                if (history := client.get_metric_history(rid, key))
            }
        except MlflowException as exc:
            gone = run_id and exc.error_code == "RESOURCE_DOES_NOT_EXIST"
            raise (RunGone if gone else TrackingError)(
                f"tracking {shown!r}: {_one_line(exc)}"
            ) from None
        if resumed:
            _log.info("tracking %s: continuing run %s (%s)", shown, rid, run_name)
        return cls(
            client.client, tracking_uri, rid, run.info.experiment_id, resumed, floors, patience_s
        )

    # -- params and tags ---------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flatten, redact and log; values already logged identically are skipped (resume).

        A different value for an existing param is refused: MLflow params are immutable.
        """
        flat = {k: v[:MAX_PARAM_VALUE] for k, v in redact(flatten_params(params)).items()}
        existing = self.patient_client.get_run(self.run_id).data.params
        new: list[Param] = []
        for key, value in flat.items():
            if key not in existing:
                new.append(Param(key, value))
            elif existing[key] != value:
                raise TrackingError(
                    f"run {self.run_id}: param {key!r} is already {_short(existing[key])!r}; "
                    f"refusing to change it to {_short(value)!r} (use a new run name)"
                )
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self.patient_client.log_batch(self.run_id, params=chunk, synchronous=True)

    def set_tag(self, key: str, value: Any) -> None:
        self.patient_client.set_tag(self.run_id, key, redact({key: value})[key])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Redacted, in batches; tags, unlike params, may change when a run is continued."""
        for chunk in _chunks([RunTag(k, v) for k, v in redact(dict(tags)).items()], 100):
            self.patient_client.log_batch(self.run_id, tags=chunk, synchronous=True)

    # -- metrics -----------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Buffer one step in memory; nothing is sent until :meth:`commit`."""
        self._check_open()
        timestamp = int(time.time() * 1000)
        for key, value in _flatten(metrics).items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TrackingError(f"metric {key!r}: value {value!r} is not a number") from None
            self._buffer[(key, int(step))] = Metric(key, number, timestamp, int(step))

    def commit(self) -> int:
        """Send the buffered steps in the background; steps already recorded are dropped.

        Returns how many metric values were queued.
        """
        self._check_open()
        batch = [m for m in self._buffer.values() if m.step > self._floors.get(m.key, -(2**63))]
        self._buffer.clear()
        for m in batch:
            self._floors[m.key] = max(m.step, self._floors.get(m.key, m.step))
        if batch:
            with self._sending:
                self._unsent.extend(batch)
                self._sending.notify_all()
        return len(batch)

    def unsent(self) -> list[Metric]:
        """The committed metrics the server has not taken yet (a checkpoint keeps them)."""
        with self._sending:
            return list(self._unsent)

    def resend(self, metrics: Iterable[Metric]) -> int:
        """Queue metrics that an earlier writer of this run had committed and not sent (a
        checkpoint's); those the server has are dropped. How many. Called before the first
        step is logged: they are committed as if they were its own."""
        self._check_open()
        self._buffer.update({(m.key, m.step): m for m in metrics})
        return self.commit()

    def discard(self) -> int:
        """Drop the buffered steps (their checkpoint was not written); returns how many."""
        dropped = len(self._buffer)
        self._buffer.clear()
        return dropped

    def sent(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the committed metrics to reach the server, less while it
        cannot be reached; whether they all did."""
        deadline = time.monotonic() + timeout_s
        with self._sending:
            while self._unsent and not self._unreachable:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._sending.wait(remaining)
            return not self._unsent

    def flush(self, patience_s: float | None = None) -> None:
        """Wait until every committed metric is sent; raise if a batch was refused, or if the
        server has not been reachable for `patience_s` (default: the logger's; counted from
        its first failed try here, MLflow's client has retried each try for minutes)."""
        patience_s = self.patience_s if patience_s is None else patience_s
        deadline = None
        with self._sending:
            while self._unsent:
                if not self._unreachable:
                    deadline = None
                    self._sending.wait()
                    continue
                if deadline is None:
                    deadline = time.monotonic() + patience_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TrackingError(
                        f"tracking {self._shown!r}: unreachable ({self._unreachable}); "
                        f"{len(self._unsent)} metric values of run {self.run_id} not sent"
                    )
                self._sending.wait(remaining)
        if self._errors:
            errors, self._errors = self._errors, []
            raise TrackingError(
                f"tracking {self._shown!r}: {len(errors)} metric batch(es) of run {self.run_id} "
                f"failed; first: {errors[0]}"
            )

    def last_step(self, key: str = "loss") -> int | None:
        """Largest step recorded on the server for metric ``key`` (after sending queued ones)."""
        self.flush()
        history = self.patient_client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def _send_loop(self) -> None:
        while True:
            with self._sending:
                while not self._unsent and not self._closed:
                    self._sending.wait()
                if self._closed and (not self._unsent or self._unreachable):
                    return
                chunk = self._unsent[:MAX_METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                failed = ""
            except Exception as exc:  # the loop must survive
                failed = unreachable_reason(exc)
                if getattr(exc, "error_code", None) in REFUSED:  # dropped; flush() raises
                    failed = _one_line(exc)
                    self._errors.append(failed)
                    _log.warning("tracking %s: metric batch refused: %s", self._shown, failed)
                    failed = ""
            with self._sending:
                if failed:
                    if not self._unreachable:
                        _log.warning(
                            "tracking %s: metrics not sent (%s); kept, and tried again every %g s",
                            self._shown,
                            failed,
                            RETRY_S,
                        )
                    self._unreachable = failed
                    self._sending.notify_all()
                    self._sending.wait(RETRY_S)  # or until end() closes the logger
                    continue
                del self._unsent[: len(chunk)]
                if self._unreachable:
                    _log.warning("tracking %s: reachable again; sending", self._shown)
                    self._unreachable = ""
                self._sending.notify_all()

    # -- artifacts ---------------------------------------------------------------------------

    def log_artifact(
        self, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        if not os.path.exists(local_path):
            raise TrackingError(f"artifact {os.fspath(local_path)!r}: no such file or folder")
        self.patient_client.log_artifact(self.run_id, os.fspath(local_path), artifact_path)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self.patient_client.log_dict(self.run_id, redact_tree(dict(dictionary)), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.patient_client.log_text(self.run_id, scrub_secrets(text), artifact_file)

    # -- end -----------------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        """Flush and close the run. FINISHED commits what is buffered; FAILED/KILLED drop it
        (a resume will recompute those steps from the last checkpoint)."""
        if status not in _STATUSES:
            raise TrackingError(f"run status {status!r}: expected one of {', '.join(_STATUSES)}")
        if self._ended:
            return
        if status == "FINISHED":
            self.commit()
        else:
            self.discard()
        self._ended = True
        try:
            self.flush()
        except BaseException:
            # The server refused a batch, or stayed away past the patience: the run is ended
            # if it answers now, with no more waiting, and the error stands.
            self._stop_sender(join=False)
            with contextlib.suppress(Exception), _fail_fast_http():
                self.client.set_terminated(self.run_id, status=status)
            raise
        self._stop_sender(join=True)
        self.patient_client.set_terminated(self.run_id, status=status)

    def _stop_sender(self, join: bool) -> None:
        """The sender ends once nothing is left to send, or at once while the server cannot
        be reached; `join`: wait for that (else it stops after its call in flight)."""
        with self._sending:
            self._closed = True
            self._sending.notify_all()
        if join:
            self._thread.join()

    def abandon(self, status: str, error: str = "") -> None:
        """End the run FAILED or KILLED on the way out of a failure or an interrupt, `error` as
        its ``dupr.error`` tag. Nothing is waited for: not the metrics in flight (what a
        checkpoint counts was sent or is carried by it; the rest is trained again), nor a
        tracking server that cannot be reached (no MLflow retries, 5 s a call). An error of
        its own is logged, never raised: it must not hide the one that ends the process."""
        if status not in _STATUSES[1:]:
            raise TrackingError(f"run status {status!r}: expected FAILED or KILLED")
        if self._ended:
            return
        self.discard()
        self._ended = True
        self._stop_sender(join=False)
        self.patient_client.patience_s = 0.0
        try:
            with _fail_fast_http():
                if error:
                    self.set_tag(ERROR_TAG, error)
                self.patient_client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            _log.warning(
                "tracking %s: run %s not ended %s (%s)",
                self._shown,
                self.run_id,
                status,
                unreachable_reason(exc),
            )

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type:
            self.abandon("FAILED")
        else:
            self.end("FINISHED")

    def _check_open(self) -> None:
        if self._ended:
            raise TrackingError(f"run {self.run_id}: already ended")


def patiently(call: Callable[[], T], patience_s: float) -> T:
    """`call()` (one MLflow call), tried again every RETRY_S while the tracking server cannot
    be reached, for up to `patience_s` beyond MLflow's own retries; any other error (a
    refusal, a missing file) is raised at once."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except MlflowException as exc:
            if exc.error_code in REFUSED or time.monotonic() > deadline:
                raise
        except _UNREACHABLE:
            if time.monotonic() > deadline:
                raise
        time.sleep(RETRY_S)


class _Patient:
    """An MlflowClient whose calls are each made `patiently` (`RunLogger.patient_client`)."""

    def __init__(self, client: MlflowClient, patience_s: float) -> None:
        self.client, self.patience_s = client, patience_s

    def __getattr__(self, name: str) -> Callable[..., Any]:
        getattr(self.client, name)  # an AttributeError now, not on a try
        return lambda *a, **kw: patiently(
            lambda: getattr(self.client, name)(*a, **kw), self.patience_s
        )


def patient_client(tracking_uri: str) -> _Patient:
    """MLflow's client of `tracking_uri` whose calls wait out an unreachable server for up to
    PATIENCE_S, for calls outside a RunLogger (a stage worker's tags on the driver's run)."""
    return _Patient(mlflow_client(tracking_uri), PATIENCE_S)


SQLITE = "sqlite:///"


def sqlite_database(tracking_uri: str) -> str | None:
    """The absolute path of a `sqlite:///` store's database file; None for other stores."""
    if not tracking_uri.startswith(SQLITE):
        return None
    return os.path.abspath(tracking_uri[len(SQLITE) :].partition("?")[0])


def absolute_tracking_uri(tracking_uri: str) -> str:
    """`tracking_uri` with a SQLite store's path made absolute against this process's
    directory (Ray tasks and workers run in others)."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return tracking_uri
    query = tracking_uri.partition("?")[2]
    return SQLITE + database + (f"?{query}" if query else "")


def local_artifacts(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the database
    (`runs/mlartifacts/<experiment>`), so the store and its artifacts stay together. MLflow's
    default is `./mlruns` of whichever directory the creating process runs in (a Ray job's
    copy of the working directory, the checkout the tests run from). None otherwise: a
    tracking server decides for itself."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return os.path.join(os.path.dirname(database), "mlartifacts", folder)


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """MLflow's client of `tracking_uri`; a SQLite store is opened under a lock beside it.

    MLflow 3.17 creates a fresh SQLite store's tables in the tracking store's constructor
    without the lock it takes for its other stores, so two processes opening a new store at
    once (two pipelines started together on the default `runs/mlflow.db`) fail with
    `duplicate column name` or `table ... already exists`. The lock file sits beside the
    database, the one place every process that opens it sees.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri)
    with filelock.FileLock(database + ".lock"):
        return MlflowClient(tracking_uri)  # creates the tables of a new store


def metric_rows(metrics: Iterable[Metric]) -> list[list[Any]]:
    """`metrics` (a logger's unsent ones) as plain rows, for a checkpoint to carry."""
    return [[m.key, m.value, m.timestamp, m.step] for m in metrics]


def metrics_from_rows(rows: Iterable[Sequence[Any]]) -> list[Metric]:
    """The metrics `metric_rows` gave."""
    return [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in rows]


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _experiment_id(
    client: _Patient, name: str, shown: str, artifact_location: str | None = None
) -> str:
    """Get or create the experiment (tolerating a concurrent creator)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:  # created, then deleted for good, by someone else meanwhile
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking {shown!r}: experiment {name!r} is deleted (restore it with "
            f"`mlflow experiments restore --experiment-id {exp.experiment_id}` or pick another name)"
        )
    return exp.experiment_id


def _find_run(client: _Patient, experiment_id: str, run_name: str, shown: str) -> Any:
    """The newest non-deleted run tagged with this run key, or None."""
    quote = "'" if "'" not in run_name else '"'
    if quote in run_name:
        raise TrackingError(f"run name {run_name!r}: may not contain both ' and \"")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = {quote}{run_name}{quote}",
        max_results=2,
        order_by=["attributes.start_time DESC"],
    )
    if len(runs) > 1:
        _log.warning("tracking %s: several runs named %r; continuing the newest", shown, run_name)
    return runs[0] if runs else None


def _get_live_run(client: _Patient, run_id: str, shown: str) -> Any:
    run = client.get_run(run_id)
    if run.info.lifecycle_stage == "deleted":
        raise RunGone(f"tracking {shown!r}: run {run_id} is deleted")
    return run
