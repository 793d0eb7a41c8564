"""MLflow tracking against a real ``mlflow server`` process with artifacts proxied to moto S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dupr_platform import tracking
from dupr_platform.recovery import Heartbeat
from dupr_platform.tracking import (
    REDACTED,
    RUN_KEY_TAG,
    RunLogger,
    TrackingError,
    check_tracking,
    flatten_params,
    metric_rows,
    metrics_from_rows,
    redact,
    redact_tree,
)
from services import free_port, list_keys, silent_endpoint

FAKE_ENV_SECRET = "env-secret-VALUE-9f3a"


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_ENV_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-abc-123456")
    return FAKE_ENV_SECRET


def _experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(dst))).read_text()


# -- pure functions ---------------------------------------------------------------------------


def test_flatten_params():
    flat = flatten_params(
        {"model": {"alpha": 0.5, "levels": [3, 4], "head": {"dim": 128}}, "crop": (0.2, 1.0)},
        prefix="cfg.",
    )
    assert flat == {
        "cfg.model.alpha": "0.5",
        "cfg.model.levels": "[3, 4]",
        "cfg.model.head.dim": "128",
        "cfg.crop": "(0.2, 1.0)",
    }
    assert flatten_params({"a": None, "b": True}) == {"a": "None", "b": "True"}


def test_redact(secret_env):
    params = {
        "storage.password": "hunter2",
        "aws.secret_key": "x",
        "hf_api_key": "abc",
        "db.Access-Key": "k",
        "copied": secret_env,
        "embedded": f"key={secret_env};",
        "uri": "postgresql://alice:pa55@db:5432/mlflow",
        "plain_uri": "s3://bucket/prefix",
        "lr": "0.03",
    }
    out = redact(params)
    assert out["storage.password"] == out["aws.secret_key"] == REDACTED
    assert out["hf_api_key"] == out["db.Access-Key"] == REDACTED
    assert out["copied"] == out["embedded"] == REDACTED
    assert out["uri"] == f"postgresql://alice:{REDACTED}@db:5432/mlflow"
    assert out["plain_uri"] == "s3://bucket/prefix" and out["lr"] == "0.03"
    assert secret_env not in json.dumps(out)

    tree = redact_tree({"a": {"token": "t", "n": 3, "urls": ["http://u:p@h/x", secret_env]}})
    assert tree == {
        "a": {"token": REDACTED, "n": 3, "urls": [f"http://u:{REDACTED}@h/x", REDACTED]}
    }


# -- preflight --------------------------------------------------------------------------------


def test_check_tracking_closed_port_is_fast():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as excinfo:
        check_tracking(uri)
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "\n" not in message and uri in message and "connection refused" in message


def test_check_tracking_hung_server_times_out():
    with silent_endpoint() as uri:
        start = time.monotonic()
        with pytest.raises(TrackingError) as excinfo:
            check_tracking(uri)
        assert time.monotonic() - start < 10
    assert f"tracking '{uri}': cannot reach the server (no answer within" in str(excinfo.value)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty URI"),
        ("ftp://host/x", "unsupported scheme 'ftp'"),
        ("./mlruns", "file store is disabled"),
        ("sqlite:///", "expected sqlite:///"),
        ("sqlite:////sys/kernel/mlflow.db", "not writable"),
    ],
)
def test_check_tracking_bad_uris(uri, fragment):
    with pytest.raises(TrackingError) as excinfo:
        check_tracking(uri)
    assert fragment in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_check_tracking_passes(mlflow_server, tmp_path, monkeypatch):
    check_tracking(mlflow_server.uri)
    check_tracking(mlflow_server.uri + "/")
    check_tracking(f"sqlite:///{tmp_path}/new/folder/mlflow.db")
    # The fail-fast overrides are restored afterwards.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    check_tracking(mlflow_server.uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


_OPEN_AT = """
import sys, time
from dupr_platform.tracking import RunLogger
uri, at, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, at - time.time()))
RunLogger.start(uri, "two-pipelines", name).end()
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_get_their_runs(tmp_path):
    """Two pipelines started together on the default `runs/mlflow.db`: each driver's first
    call opens its run in a store none has created yet. MLflow creates a new store's tables
    unlocked (`duplicate column name`, `table ... already exists` without the lock)."""
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    check_tracking(uri)  # the drivers' preflight: the folder, not the store
    at = time.time() + 6.0  # after every process has imported MLflow
    names = [f"pipeline-{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT, uri, str(at), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.time() > at  # they did meet at the start line
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("two-pipelines")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in runs) == names
    # Artifacts beside the store, not in ./mlruns of the directory a process ran in.
    assert experiment.artifact_location == str(tmp_path / "runs" / "mlartifacts" / "two-pipelines")


# -- RunLogger against the real server --------------------------------------------------------


def test_params_idempotent_immutable_and_redacted(mlflow_server, secret_env):
    logger = RunLogger.start(
        mlflow_server.uri, _experiment(), "params-run", tags={"team": "vision"}
    )
    config = {
        "model": {"alpha": 0.5, "levels": [3, 4]},
        "storage": {"uri": "s3://bkt/x", "secret_access_key": secret_env},
        "copied_secret": secret_env,
        "many": {f"p{i:03d}": i for i in range(230)},  # more than one log_batch of params
        "long": "x" * 7000,
    }
    logger.log_params(config)
    logger.log_params(config)  # same values again (a resumed run): no error, nothing changes
    with pytest.raises(TrackingError) as excinfo:
        logger.log_params({"model": {"alpha": 0.7}})
    message = str(excinfo.value)
    assert "'model.alpha'" in message and "'0.5'" in message and "\n" not in message

    run = MlflowClient(mlflow_server.uri).get_run(logger.run_id)
    params = run.data.params
    assert params["model.alpha"] == "0.5" and params["model.levels"] == "[3, 4]"
    assert params["storage.secret_access_key"] == REDACTED and params["copied_secret"] == REDACTED
    assert len([k for k in params if k.startswith("many.")]) == 230
    assert len(params["long"]) == 6000
    assert run.data.tags["team"] == "vision" and run.data.tags[RUN_KEY_TAG] == "params-run"
    everything = json.dumps([params, run.data.tags])
    assert secret_env not in everything and "tok-abc-123456" not in everything
    logger.end()


def test_metrics_commit_discard_and_batching(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    logger = RunLogger.start(mlflow_server.uri, _experiment(), "metrics-run")
    for step in range(5):
        logger.log_metrics(step, {"loss": 1.0 / (step + 1), "opt": {"lr": 0.1}})
    assert client.get_metric_history(logger.run_id, "loss") == []  # only buffered so far
    assert logger.commit() == 10
    logger.flush()
    assert _steps(client, logger.run_id, "loss") == [0, 1, 2, 3, 4]
    assert _steps(client, logger.run_id, "opt.lr") == [0, 1, 2, 3, 4]
    assert client.get_metric_history(logger.run_id, "loss")[2].value == pytest.approx(1 / 3)

    logger.log_metrics(5, {"loss": 0.1})
    logger.log_metrics(6, {"loss": 0.1})
    assert logger.discard() == 2  # no checkpoint at step 6: these steps never reach MLflow
    for step in range(5, 1205):  # 2400 values: three log_batch calls of <= 1000
        logger.log_metrics(step, {"loss": 0.5, "acc": 0.9})
    start = time.monotonic()
    assert logger.commit() == 2400
    assert time.monotonic() - start < 0.5  # commit only queues
    assert logger.last_step() == 1204  # waits for the background send
    assert _steps(client, logger.run_id, "acc") == list(range(5, 1205))
    assert len(client.get_metric_history(logger.run_id, "loss")) == 1205
    with pytest.raises(TrackingError, match="not a number"):
        logger.log_metrics(7, {"loss": "nan-ish"})
    logger.end()
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_background_failure_surfaces_on_flush(mlflow_server):
    logger = RunLogger.start(mlflow_server.uri, _experiment(), "bad-metric-run")
    logger.log_metrics(0, {"bad?name*": 1.0})
    logger.commit()
    with pytest.raises(TrackingError) as excinfo:
        logger.flush()
    assert "1 metric batch(es)" in str(excinfo.value) and "\n" not in str(excinfo.value)
    logger.log_metrics(1, {"loss": 1.0})  # the sender survived the failure
    logger.commit()
    assert logger.last_step() == 1
    logger.end("KILLED")


def test_metrics_wait_out_an_unreachable_server_and_travel_with_a_checkpoint(
    mlflow_server, monkeypatch
):
    """While the server cannot be reached (here: a port with nothing on it, and no MLflow
    retries), committed metrics are kept in order and tried again; `unsent` lists them for a
    checkpoint, `flush` raises only after its patience, and once the server answers they go
    through, each step once. A resumed writer `resend`s what a checkpoint carried."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_S", 0.2)
    client = MlflowClient(mlflow_server.uri)
    logger = RunLogger.start(mlflow_server.uri, _experiment(), "outage-run")
    logger.client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server is down
    for step in (1, 2):
        logger.log_metrics(step, {"loss": 1.0 / step})
    logger.commit()
    assert not logger.sent(timeout_s=30)  # returns once a try failed, not after 30 s
    assert [m.step for m in logger.unsent()] == [1, 2]
    with pytest.raises(TrackingError, match="unreachable .*; 2 metric values of run") as excinfo:
        logger.flush(patience_s=0.5)
    assert "\n" not in str(excinfo.value)
    logger.log_metrics(3, {"loss": 0.3})  # training goes on meanwhile
    logger.commit()
    carried = json.loads(json.dumps(metric_rows(logger.unsent())))  # what a checkpoint carries
    assert [m.step for m in metrics_from_rows(carried)] == [1, 2, 3]

    logger.client = client  # the server is back
    logger.flush(patience_s=60)
    assert _steps(client, logger.run_id, "loss") == [1, 2, 3]
    logger.end()

    # A writer that dies while the server is down; the one that resumes from its checkpoint
    # sends what the checkpoint carries.
    lost = RunLogger.start(mlflow_server.uri, _experiment(), "outage-crash")
    lost.client = MlflowClient(f"http://127.0.0.1:{free_port()}")
    lost.log_metrics(1, {"loss": 1.0})
    lost.commit()
    assert not lost.sent(timeout_s=30)
    carried = json.loads(json.dumps(metric_rows(lost.unsent())))
    lost.abandon("KILLED")  # on the way out: no waiting, and no error of its own
    resumed = RunLogger.start(mlflow_server.uri, "", "", run_id=lost.run_id)
    assert resumed.resend(metrics_from_rows(carried)) == 1
    assert resumed.resend(metrics_from_rows(carried)) == 0  # queued already
    resumed.end()
    assert _steps(client, lost.run_id, "loss") == [1]


def test_a_writer_that_starts_during_an_outage_waits_for_the_server(
    mlflow_server, monkeypatch, tmp_path
):
    """A worker restarted (or a stage launched) while the tracking server cannot be reached
    opens its run, and makes its calls, once the server is back: each waits up to the
    logger's patience. A request the server refuses, or an error of another kind, is raised
    at once. On the way out of a failure, `abandon` waits for nothing: not for MLflow's own
    retries (on here), and an error of its own is not raised."""
    from mlflow.exceptions import MlflowException

    from services import OutageClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking, "RETRY_S", 0.1)
    client = MlflowClient(mlflow_server.uri)
    first = RunLogger.start(mlflow_server.uri, _experiment(), "restarted")
    first.log_metrics(1, {"loss": 1.0})
    first.end("KILLED")  # the worker that died

    back = threading.Event()
    live = tracking.MlflowClient
    monkeypatch.setattr(tracking, "MlflowClient", lambda uri: OutageClient(live(uri), back))
    threading.Timer(1.0, back.set).start()
    began = time.monotonic()
    resumed = RunLogger.start(mlflow_server.uri, "", "", run_id=first.run_id, patience_s=60)
    assert time.monotonic() - began >= 1.0
    assert resumed.run_id == first.run_id and resumed.patience_s == 60
    back.clear()  # down again
    threading.Timer(0.5, back.set).start()
    resumed.set_tag("dupr.resumed_at_step", "8")
    assert client.get_run(first.run_id).data.tags["dupr.resumed_at_step"] == "8"
    assert client.get_run(first.run_id).info.status == "RUNNING"

    # Past its patience, a call fails with MLflow's error; a refusal or another error at once.
    back.clear()
    began = time.monotonic()
    with pytest.raises(MlflowException, match="Connection refused"):
        tracking.patiently(lambda: resumed.client.get_run(first.run_id), 0.3)
    assert 0.3 <= time.monotonic() - began < 10
    began = time.monotonic()
    with pytest.raises(MlflowException) as refused:
        tracking.patiently(lambda: client.get_run("0" * 32), 60)
    assert refused.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(FileNotFoundError):
        tracking.patiently(lambda: (tmp_path / "missing.txt").read_text(), 60)
    assert time.monotonic() - began < 10

    # Ending a run whose metrics cannot be sent: the error once the patience is spent, and
    # no second wait to end it.
    back.set()
    impatient = RunLogger.start(mlflow_server.uri, _experiment(), "impatient", patience_s=0.3)
    impatient.client = live(f"http://127.0.0.1:{free_port()}")
    impatient.log_metrics(1, {"loss": 1.0})
    began = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        impatient.end()
    assert time.monotonic() - began < 10
    back.clear()

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # MLflow's retries: minutes
    resumed.log_metrics(9, {"loss": 0.5})
    resumed.commit()
    began = time.monotonic()
    resumed.abandon("FAILED", "boom")
    assert time.monotonic() - began < 15
    assert client.get_run(first.run_id).info.status == "RUNNING"  # it could not be told


def test_the_driver_says_once_that_tracking_is_unreachable_and_when_it_is_back(
    mlflow_server, monkeypatch, capsys
):
    """The driver's heartbeat is what notices an outage first: one short line, not one per
    beat, and one when a beat goes through again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = RunLogger.start(mlflow_server.uri, _experiment(), "heartbeat-run")
    heartbeat = Heartbeat(run, "pipeline", interval_s=0.1)
    heartbeat.client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server is down
    time.sleep(1.0)
    heartbeat.client = run.client
    time.sleep(1.0)
    heartbeat.stop()
    run.end()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        f"[pipeline] tracking {mlflow_server.uri}: unreachable ([Errno 111] Connection "
        "refused); training goes on, its metrics are kept until the server is back",
        f"[pipeline] tracking {mlflow_server.uri}: reachable again",
    ]


def test_restart_continues_same_run_exactly_once(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    experiment = _experiment()
    first = RunLogger.start(mlflow_server.uri, experiment, "resumable", tags={"attempt": "1"})
    assert not first.resumed and first.last_step() is None
    first.log_params({"lr": 0.03})
    for step in range(1, 6):
        first.log_metrics(step, {"loss": 10.0 - step})
    first.commit()  # checkpoint at step 5 written
    first.flush()
    for step in (6, 7):
        first.log_metrics(step, {"loss": 0.0})  # lost in the "crash": never committed
    first.end("FAILED")
    assert client.get_run(first.run_id).info.status == "FAILED"

    # The restarted driver resumes from a checkpoint at step 3 and replays steps 4..8.
    second = RunLogger.start(mlflow_server.uri, experiment, "resumable", tags={"attempt": "2"})
    assert second.run_id == first.run_id and second.resumed
    assert client.get_run(second.run_id).info.status == "RUNNING"
    assert second.last_step() == 5
    second.log_params({"lr": 0.03})  # idempotent on resume
    for step in range(4, 9):
        second.log_metrics(step, {"loss": 100.0 + step})
    assert second.commit() == 3  # steps 4 and 5 are already recorded
    second.end()
    history = {m.step: m.value for m in client.get_metric_history(first.run_id, "loss")}
    assert sorted(history) == [1, 2, 3, 4, 5, 6, 7, 8]  # every step exactly once
    assert history[5] == 5.0 and history[6] == 106.0
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # Explicit run id, a different run name, and a child run.
    again = RunLogger.start(mlflow_server.uri, experiment, "ignored-name", run_id=first.run_id)
    assert again.run_id == first.run_id
    again.end()
    other = RunLogger.start(mlflow_server.uri, experiment, "other", parent_run_id=first.run_id)
    assert other.run_id != first.run_id and not other.resumed
    assert client.get_run(other.run_id).data.tags["mlflow.parentRunId"] == first.run_id
    other.end()


def test_context_manager_commits_on_success_and_fails_on_error(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    experiment = _experiment()
    with RunLogger.start(mlflow_server.uri, experiment, "ok") as logger:
        logger.log_metrics(0, {"loss": 1.0})
    assert _steps(client, logger.run_id, "loss") == [0]
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    failing = RunLogger.start(mlflow_server.uri, experiment, "boom")
    with pytest.raises(RuntimeError), failing:
        failing.log_metrics(0, {"loss": 1.0})
        raise RuntimeError("training crashed")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert client.get_metric_history(failing.run_id, "loss") == []
    with pytest.raises(TrackingError, match="run status 'DONE'"):
        logger.end("DONE")


def test_artifacts_go_through_the_server_into_s3(mlflow_server, tmp_path, secret_env):
    logger = RunLogger.start(mlflow_server.uri, _experiment(), "artifact-run")
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"\x00" * 2048)
    logger.log_artifact(weights, "weights")
    logger.log_dict({"storage": {"password": "p"}, "echo": secret_env, "lr": 0.03}, "config.json")
    logger.log_text(f"resolved with {secret_env}\n", "notes/run.txt")
    logger.set_tag("endpoint", "http://bob:pw@host:9000")
    with pytest.raises(TrackingError, match="no such file"):
        logger.log_artifact(tmp_path / "missing.bin")
    logger.end()

    keys = list_keys(mlflow_server.s3_endpoint_url, mlflow_server.artifact_bucket)
    mine = [k for k in keys if f"/{logger.run_id}/artifacts/" in k]
    assert sorted(k.split("/artifacts/", 1)[1] for k in mine) == [
        "config.json",
        "notes/run.txt",
        "weights/encoder.pt",
    ]
    client = MlflowClient(mlflow_server.uri)
    config = json.loads(_download(client, logger.run_id, "config.json", tmp_path))
    assert config == {"storage": {"password": REDACTED}, "echo": REDACTED, "lr": 0.03}
    notes = _download(client, logger.run_id, "notes/run.txt", tmp_path)
    assert secret_env not in notes and REDACTED in notes
    assert client.get_run(logger.run_id).data.tags["endpoint"] == f"http://bob:{REDACTED}@host:9000"


def test_deleted_experiment_is_a_clear_error(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    name = _experiment()
    client.delete_experiment(client.create_experiment(name))
    with pytest.raises(TrackingError) as excinfo:
        RunLogger.start(mlflow_server.uri, name, "r")
    assert f"experiment '{name}' is deleted" in str(excinfo.value)
