"""Run-time failures that a restart cannot fix: fail once, naming the cause and the checkpoint.

Ray Train restarts the worker group after any worker error, up to `max_failures` times: the
right answer to a lost node, the wrong one to an object store that is down or data that does
not decode, where every restart fails the same way after minutes of start-up. The training
workers raise `UnrecoverableError` for those (`dupr_platform.ray_pretrain.train_worker` decides),
and `StopOnUnrecoverable`, a Ray Train callback on the controller, stops the run at the first
such error with one line that names the cause and the last complete checkpoint. Any other
error is left to Ray's retries.

Ray Train has no public switch for "do not retry this error"; the callback relies on Ray Train
2.60 ending the run when `UserCallback.after_exception` raises (its controller turns the
exception into a non-retryable `ControllerError`). `tests/test_storage_outage.py` checks that
behaviour, so an upgrade that changes it is caught.

This module is small on purpose: the controller actor imports it to unpickle the callback.
"""

from __future__ import annotations

from typing import Any

import ray.train


class UnrecoverableError(RuntimeError):
    """A failure that a restart cannot fix; the message is one line for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __reduce__(self) -> tuple[type[UnrecoverableError], tuple[str]]:
        # One string argument: the error crosses processes (worker → controller → driver).
        return (type(self), (str(self),))


@ray.remote(num_cpus=0)
class CheckpointLedger:
    """The latest complete checkpoint, kept outside the storage that holds it.

    Ray Train records its checkpoints in a snapshot file in the run's storage; when that
    storage is down, the driver cannot read the snapshot to name the checkpoint a rerun will
    resume from. The controller's `StopOnUnrecoverable` writes each checkpoint here as Ray
    records it, so the driver's failure line names it even then.
    """

    def __init__(self, uri: str | None) -> None:
        self.uri = uri

    def record(self, uri: str) -> None:
        self.uri = uri

    def latest(self) -> str | None:
        return self.uri


class StopOnUnrecoverable(ray.train.UserCallback):
    """Ends the run at the first `UnrecoverableError` of any worker (no restart).

    `last_checkpoint` is the latest complete checkpoint when the run (re)starts; the callback
    follows every checkpoint reported after that, and tells `ledger` (a `CheckpointLedger`)
    when one is given. `uri_prefix` turns Ray's path inside the storage filesystem into the
    URI the user knows ("s3://" for S3, "" for local folders).
    """

    def __init__(
        self, last_checkpoint: str | None, uri_prefix: str = "", ledger: Any = None
    ) -> None:
        self.last_checkpoint = last_checkpoint
        self.uri_prefix = uri_prefix
        self.ledger = ledger

    def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
        # Ray calls this after its checkpoint manager has written the snapshot that names
        # `checkpoint` (the manager is the first report callback), so it is complete.
        if checkpoint is not None:
            self.last_checkpoint = self.uri_prefix + checkpoint.path
            if self.ledger is not None:
                self.ledger.record.remote(self.last_checkpoint)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            if isinstance(exc, UnrecoverableError):
                raise UnrecoverableError(
                    f"{exc} (rank {rank}; not retried); last complete checkpoint: "
                    f"{self.last_checkpoint or 'none'}; once the cause is fixed, the same "
                    "command resumes from it"
                )
