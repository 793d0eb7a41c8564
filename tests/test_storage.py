"""Object storage: local folders and a real S3-protocol server (moto), preflight errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dupr_platform.storage import (
    Storage,
    StorageError,
    aws_settings,
    check_storage,
    localize,
    open_storage,
    ray_storage_args,
)
from services import FAKE_SECRET, free_port, list_keys, make_bucket, silent_endpoint


def _one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_local_round_trip_is_atomic(tmp_path):
    store = open_storage(str(tmp_path / "store"))
    assert store.uri == str(tmp_path / "store") and os.path.isdir(store.uri)
    store.write_bytes("a/b/blob.bin", b"\x00\x01payload")
    store.write_json("a/meta.json", {"step": 3, "ok": True})
    store.write_bytes("a/b/blob.bin", b"second version")  # overwrite in place

    assert store.read_bytes("a/b/blob.bin") == b"second version"
    assert store.read_json("a/meta.json") == {"step": 3, "ok": True}
    assert store.exists("a/b/blob.bin") and not store.exists("a/missing")
    assert store.list("a") == ["b", "meta.json"]
    assert store.list("a", recursive=True) == ["b", "b/blob.bin", "meta.json"]
    assert store.list("nothing-here") == []
    assert store.uri_for("a", "meta.json") == str(tmp_path / "store" / "a" / "meta.json")
    # No temp files survive the atomic writes.
    leftovers = [f for _, _, files in os.walk(store.uri) for f in files if f.endswith(".tmp")]
    assert leftovers == []

    with pytest.raises(StorageError, match="non-empty folder"):
        store.delete("a")
    store.delete("a", recursive=True)
    store.delete("a")  # missing: no-op
    assert store.list() == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/meta.json")


def test_local_file_uri_and_path_guards(tmp_path):
    store = open_storage(f"file://{tmp_path}/via-uri")
    assert store.path == str(tmp_path / "via-uri")
    assert isinstance(store.filesystem, pafs.LocalFileSystem)
    with pytest.raises(StorageError, match="leaves the storage root"):
        store.join("..", "etc")
    with pytest.raises(StorageError, match="storage root"):
        store.delete("", recursive=True)
    check_storage(store)
    assert store.list() == []  # the preflight marker is gone
    assert ray_storage_args(store) == {
        "storage_path": store.path,
        "storage_filesystem": store.filesystem,
    }


def _refuses_writes(folder: Path) -> bool:
    try:
        (folder / "dupr-write-probe").open("wb").close()
    except PermissionError:
        return True
    except OSError:
        return False
    (folder / "dupr-write-probe").unlink()
    return False


def test_local_permission_denied(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    elif _refuses_writes(Path("/sys/kernel")):
        folder = Path("/sys/kernel")  # root ignores mode bits; sysfs still refuses new files
    else:
        pytest.skip("running as root with no folder that refuses writes")
    try:
        with pytest.raises(StorageError) as excinfo:
            check_storage(open_storage(str(folder)))
        _one_line_error(excinfo, f"storage '{folder}'", "permission denied")
    finally:
        if os.geteuid() != 0:
            folder.chmod(0o700)


def test_local_uncreatable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError) as excinfo:
        open_storage(str(blocker / "sub"))
    _one_line_error(excinfo, str(blocker / "sub"), "cannot create")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        (
            "gs://x",
            "storage 'gs://x': unsupported scheme 'gs' (use a local path or s3://bucket/prefix)",
        ),
        ("hdfs://nn/x", "unsupported scheme 'hdfs'"),
        ("s3:///prefix-only", "missing bucket name"),
        ("s3://", "missing bucket name"),
        ("s3://Bad_Bucket/x", "invalid bucket name 'Bad_Bucket'"),
        ("s3://bucket/x?endpoint_override=h:1", "query parameters are not supported"),
        ("", "empty URI"),
    ],
)
def test_bad_uris_fail_with_one_line(uri, fragment):
    with pytest.raises(StorageError) as excinfo:
        open_storage(uri)
    assert isinstance(excinfo.value, ValueError)
    _one_line_error(excinfo, fragment)


def test_bad_endpoint_is_named(s3_env):
    with pytest.raises(StorageError) as excinfo:
        open_storage("s3://bucket/x", endpoint_url="ftp://127.0.0.1:1")
    _one_line_error(excinfo, "invalid S3 endpoint 'ftp://127.0.0.1:1'")


def test_s3_round_trip(s3_env):
    bucket = make_bucket(s3_env.endpoint_url)
    store = open_storage(f"s3://{bucket}/runs/exp1/")
    assert store.uri == f"s3://{bucket}/runs/exp1" and store.path == f"{bucket}/runs/exp1"
    assert isinstance(store.filesystem, pafs.S3FileSystem)

    store.write_bytes("ckpt/0001/model.pt", b"weights" * 1000)
    store.write_json("ckpt/0001/meta.json", {"epoch": 1})
    store.write_bytes("ckpt/0001/model.pt", b"new weights")
    assert store.read_bytes("ckpt/0001/model.pt") == b"new weights"
    assert store.read_json("ckpt/0001/meta.json") == {"epoch": 1}
    assert store.exists("ckpt/0001/meta.json") and not store.exists("ckpt/0002")
    assert store.list("ckpt") == ["0001"]
    assert store.list("ckpt/0001") == ["meta.json", "model.pt"]
    assert store.uri_for("ckpt", "0001/model.pt") == f"s3://{bucket}/runs/exp1/ckpt/0001/model.pt"
    # The objects are real: another client (boto3) sees them under the prefix.
    assert list_keys(s3_env.endpoint_url, bucket, "runs/exp1/ckpt/") == [
        "runs/exp1/ckpt/0001/meta.json",
        "runs/exp1/ckpt/0001/model.pt",
    ]

    store.delete("ckpt/0001/model.pt")
    assert store.list("ckpt/0001") == ["meta.json"]
    store.delete("ckpt", recursive=True)
    assert not store.exists("ckpt/0001/meta.json")
    assert [k for k in list_keys(s3_env.endpoint_url, bucket) if "ckpt/0001/" in k] == []

    args = ray_storage_args(store)
    assert args == {"storage_path": f"{bucket}/runs/exp1", "storage_filesystem": store.filesystem}


def test_endpoint_argument_beats_environment(s3_env, monkeypatch):
    bucket = make_bucket(s3_env.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # dead
    store = open_storage(f"s3://{bucket}", endpoint_url=s3_env.endpoint_url)
    check_storage(store)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint_url)
    check_storage(open_storage(f"s3://{bucket}/p"))


def test_check_storage_good_bucket_leaves_no_marker(s3_env):
    bucket = make_bucket(s3_env.endpoint_url)
    check_storage(open_storage(f"s3://{bucket}/pre/fix"))
    assert [k for k in list_keys(s3_env.endpoint_url, bucket) if "preflight" in k] == []


def test_check_storage_missing_bucket(s3_env):
    with pytest.raises(StorageError) as excinfo:
        check_storage(open_storage("s3://no-such-bucket-here/x"))
    msg = _one_line_error(
        excinfo, "s3://no-such-bucket-here/x", "bucket 'no-such-bucket-here' does not exist"
    )
    assert FAKE_SECRET not in msg


def test_check_storage_unreachable_endpoint_is_fast(s3_env, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    start = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        check_storage(open_storage("s3://some-bucket/x"))
    assert time.monotonic() - start < 15
    msg = _one_line_error(excinfo, "s3://some-bucket/x", f"endpoint {dead} unreachable")
    assert FAKE_SECRET not in msg


def test_check_storage_hung_endpoint_times_out(s3_env, monkeypatch):
    with silent_endpoint() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        start = time.monotonic()
        with pytest.raises(StorageError) as excinfo:
            check_storage(open_storage("s3://some-bucket/x"))
        assert time.monotonic() - start < 15
    _one_line_error(excinfo, "s3://some-bucket/x", f"endpoint {endpoint} did not answer in time")


def test_check_storage_credentials(s3_iam_server, monkeypatch):
    """moto with IAM auth on: right keys pass; wrong secret, unknown key, no policy fail."""
    server = s3_iam_server
    uri = f"s3://{server.bucket}/runs"
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    check_storage(open_storage(uri))

    cases = [
        (server.access_key, "wrong-secret-value-123", "secret key does not match"),
        ("UNKNOWN-TEST-KEY-000", "another-secret-456", "access key id is unknown"),
        (server.denied_access_key, server.denied_secret_key, "access denied"),
    ]
    for key, secret, cause in cases:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with pytest.raises(StorageError) as excinfo:
            check_storage(open_storage(uri))
        msg = _one_line_error(excinfo, f"storage '{uri}'", cause)
        assert secret not in msg and key not in msg


def test_aws_settings_pass_endpoints_never_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env.endpoint_url)
    monkeypatch.setenv("UNRELATED_VAR", "x")
    env = aws_settings()
    assert env["AWS_ENDPOINT_URL"] == s3_env.endpoint_url
    assert env["MLFLOW_S3_ENDPOINT_URL"] == s3_env.endpoint_url
    assert "UNRELATED_VAR" not in env
    # Credentials never travel in a Ray runtime environment (Ray logs those in full).
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env)
    assert FAKE_SECRET not in repr(env)
    assert FAKE_SECRET not in repr(open_storage("s3://bucket-x/y").filesystem)


def test_storage_is_frozen(tmp_path):
    store = open_storage(str(tmp_path))
    with pytest.raises(AttributeError):
        store.path = "/elsewhere"  # type: ignore[misc]
    assert isinstance(store, Storage)


def test_upload_download_and_localize_an_s3_folder(s3_env, tmp_path):
    """Evaluation data on S3 is read through the storage layer: copied once per version."""
    make_bucket(s3_env.endpoint_url, "evaldata")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(b"A" * 100)
    (src / "instances.json").write_text('{"images": []}')
    storage = open_storage("s3://evaldata/sets")
    storage.upload(src, "det")
    assert storage.read_bytes("det/images/a.jpg") == b"A" * 100

    cache = tmp_path / "cache"
    local = Path(localize("s3://evaldata/sets/det", cache))
    assert (local / "images" / "a.jpg").read_bytes() == b"A" * 100
    assert localize("s3://evaldata/sets/det", cache) == str(local)  # cached: same copy
    single = Path(localize("s3://evaldata/sets/det/instances.json", cache))
    assert single.read_text() == '{"images": []}'

    # New contents under the same URI are fetched again, never served stale.
    time.sleep(1.1)
    storage.write_bytes("det/images/a.jpg", b"B" * 50)
    fresh = Path(localize("s3://evaldata/sets/det", cache))
    assert fresh != local and (fresh / "images" / "a.jpg").read_bytes() == b"B" * 50
    assert localize(str(src), cache) == str(src)  # local paths are used in place
    with pytest.raises(FileNotFoundError, match="s3://evaldata/sets/missing"):
        localize("s3://evaldata/sets/missing", cache)


@pytest.mark.slow
def test_tune_copies_no_credentials_yet_the_sweeps_storage_keeps_them(s3_iam_server, monkeypatch):
    """During a sweep's `tuner.fit()` Ray Tune must not copy the AWS keys into its trials'
    runtime environments (Ray logs those), while Tune's own calls to the sweep's s3:// folder
    still sign with them: the store here rejects anonymous requests."""
    from ray.tune.execution import class_cache

    from dupr_platform.cluster import credentials_withheld

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_iam_server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_iam_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_iam_server.secret_key)
    storage = open_storage(f"s3://{s3_iam_server.bucket}/sweeps")
    keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    with credentials_withheld():
        assert not keys & class_cache.ENV_VARS_TO_PROPAGATE
        storage.filesystem.create_dir(f"{storage.path}/tune")  # as Tune's storage setup does
        storage.write_bytes("tune/state.json", b"{}")
    assert storage.read_bytes("tune/state.json") == b"{}"
    assert keys <= class_cache.ENV_VARS_TO_PROPAGATE  # restored for anything else
