"""Object storage for checkpoints, caches and results, through ``pyarrow.fs``.

One URI names the store: a local folder (laptop default) or ``s3://bucket/prefix`` (cluster).
pyarrow's filesystems are what Ray Train takes as ``storage_filesystem``, so the trainer, the
pipeline stages and the tests share one object instead of three S3 clients.

Custom S3 endpoints (MinIO, moto, Ceph): a bare ``pyarrow.fs.S3FileSystem()`` ignores
``AWS_ENDPOINT_URL``, so :func:`open_storage` reads it (or ``AWS_ENDPOINT_URL_S3``) explicitly.
Credentials come only from the process's environment (or pyarrow's AWS credential chain:
instance profiles, web identity); they are handed to pyarrow in memory and never written to
logs, params, errors or Ray's runtime environments. Ray workers get them where clusters provide
them: the node's environment (inherited from the driver on a local instance).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from dupr.config import ConfigError
from dupr.io import write_atomically

__all__ = [
    "Storage",
    "StorageError",
    "aws_settings",
    "check_storage",
    "localize",
    "uri_exists",
    "contains_secret",
    "mask_userinfo",
    "open_storage",
    "ray_storage_args",
    "scrub_secrets",
    "secret_env_values",
    "split_uri",
]

# Object-storage settings that are not secrets: forwarded to Ray workers on other nodes.
AWS_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
# The credential variables of object storage; a node without them (and without another
# credential source) cannot reach the store.
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Environment variables whose values are secrets wherever they show up.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
)
_SECRET_ENV_SUFFIXES = ("_SECRET_ACCESS_KEY", "_TOKEN", "_PASSWORD", "_SECRET", "_API_KEY")
REDACTED = "***REDACTED***"
_MIN_SUBSTRING_SECRET = 4

# Preflight: fail within seconds on a dead endpoint instead of retrying for minutes.
_CHECK_CONNECT_TIMEOUT_S = 3.0
_CHECK_REQUEST_TIMEOUT_S = 5.0
# Normal traffic: a few retries survive transient errors of a real object store.
_CONNECT_TIMEOUT_S = 10.0
_REQUEST_TIMEOUT_S = 60.0
_MAX_ATTEMPTS = 5

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# pyarrow's AWS error codes (from the message "AWS Error <CODE> during <Op> ...") → cause.
_S3_CAUSES = {
    "NO_SUCH_BUCKET": "bucket {bucket!r} does not exist",
    "ACCESS_DENIED": "access denied (check the credentials and the bucket policy)",
    "INVALID_ACCESS_KEY_ID": "invalid credentials: the access key id is unknown to the server",
    "SIGNATURE_DOES_NOT_MATCH": "invalid credentials: the secret key does not match the key id",
    "INVALID_SIGNATURE": "invalid credentials: the request signature was rejected",
    "EXPIRED_TOKEN": "invalid credentials: the session token has expired",
    "INVALID_CLIENT_TOKEN_ID": "invalid credentials: the security token is not valid",
    "NETWORK_CONNECTION": "endpoint {endpoint} unreachable ({detail})",
    "REQUEST_TIMEOUT": "endpoint {endpoint} did not answer in time",
    "RESOURCE_NOT_FOUND": "endpoint {endpoint} answered 404 without an S3 error (not an S3 server?)",
}


class StorageError(ValueError):
    """A storage URI, endpoint or credential problem, phrased as one line for the user."""


@dataclass(frozen=True)
class Storage:
    """A folder in some filesystem: ``path`` is the root inside ``filesystem``.

    ``uri`` is the normalized human form (absolute local path or ``s3://bucket/prefix``);
    ``endpoint_url`` is kept so a preflight can build a fail-fast twin of the filesystem.
    """

    uri: str
    filesystem: pafs.FileSystem
    path: str
    endpoint_url: str | None = None

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        """Path inside the filesystem; refuses ``..`` so no caller can escape the root."""
        segments = [self.path.rstrip("/")] if self.path else []
        for part in parts:
            for seg in str(part).split("/"):
                if seg in ("", "."):
                    continue
                if seg == "..":
                    raise StorageError(
                        f"storage {self.uri!r}: path {part!r} leaves the storage root"
                    )
                segments.append(seg)
        return "/".join(segments) if segments else "/"

    def uri_for(self, *parts: str) -> str:
        """Where another process or a human finds the object: a local path or an s3:// URI."""
        path = self.join(*parts)
        return path if self.is_local else f"s3://{path}"

    def exists(self, rel: str) -> bool:
        return self.filesystem.get_file_info(self.join(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the new one, never a partial one.

        Local: a temp file in the same folder, fsync, ``os.replace``. S3: one PUT (or one
        completed multipart upload) makes the object appear whole.
        """
        path = self.join(rel)
        if not self.is_local:
            with self.filesystem.open_output_stream(path) as out:
                out.write(data)
            return
        write_atomically(path, data)

    def read_bytes(self, rel: str) -> bytes:
        path = self.join(rel)
        if self.filesystem.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"no object {self.uri_for(rel)!r}")
        with self.filesystem.open_input_stream(path) as src:
            return src.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel).decode("utf-8"))

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Sorted entries under ``rel``, relative to it; a missing folder lists as empty."""
        base = self.join(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        prefix = base.rstrip("/") + "/"
        names = {
            info.path[len(prefix) :] if info.path.startswith(prefix) else info.base_name
            for info in self.filesystem.get_file_info(selector)
        }
        return sorted(n for n in names if n)

    def upload(self, local_path: str | os.PathLike[str], rel: str) -> None:
        """Copy a local file or folder to ``rel`` (pyarrow.fs.copy_files; parallel on S3)."""
        local = os.path.abspath(local_path)
        if os.path.isfile(local):
            with open(local, "rb") as src:
                self.write_bytes(rel, src.read())
            return
        if self.is_local:
            os.makedirs(self.join(rel), exist_ok=True)
        pafs.copy_files(
            local,
            self.join(rel),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )

    def download(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        """Copy the file or folder ``rel`` to a local path."""
        path = self.join(rel)
        kind = self.filesystem.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no object {self.uri_for(rel)!r}")
        if kind == pafs.FileType.Directory:
            os.makedirs(local_path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        pafs.copy_files(
            path,
            os.path.abspath(local_path),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )

    def delete(self, rel: str, recursive: bool = False) -> None:
        """Delete a file, or a folder (``recursive`` when not empty); missing is a no-op."""
        path = self.join(rel)
        if path.rstrip("/") == self.path.rstrip("/"):
            raise StorageError(f"storage {self.uri!r}: refusing to delete the storage root")
        kind = self.filesystem.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            return
        if kind == pafs.FileType.File:
            self.filesystem.delete_file(path)
        elif recursive or not self.list(rel):
            self.filesystem.delete_dir(path)
        else:
            raise StorageError(f"storage {self.uri!r}: {rel!r} is a non-empty folder")


def split_uri(uri: str) -> tuple[Storage, str]:
    """The storage holding ``uri`` and the object's name in it (a local file or s3:// key)."""
    if "://" in uri and not uri.startswith("file://"):
        head, _, name = uri.rstrip("/").rpartition("/")
        return open_storage(head), name
    path = os.path.abspath(urlsplit(uri).path if uri.startswith("file://") else uri)
    return Storage(
        uri=os.path.dirname(path), filesystem=pafs.LocalFileSystem(), path=os.path.dirname(path)
    ), os.path.basename(path)


def _fingerprint(storage: Storage, name: str) -> str:
    """Sizes and modification times of the object(s): new contents get a new cache entry."""
    path = storage.join(name)
    info = storage.filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no object {storage.uri_for(name)!r}")
    infos = [info]
    if info.type == pafs.FileType.Directory:
        infos = storage.filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return ";".join(sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos))


def uri_exists(uri: str) -> bool:
    """Whether a local path or an s3:// object or prefix exists."""
    if "://" not in uri:
        return os.path.exists(uri)
    storage, name = split_uri(uri)
    return storage.exists(name)


def localize(uri: str, cache_dir: str | os.PathLike[str]) -> str:
    """A local path for ``uri``: local paths as they are, s3:// objects copied once.

    Evaluation code (dupr/) reads local files; data and weights on object storage are copied
    into ``cache_dir`` under a name derived from the URI and the objects' sizes and times,
    completed by a marker file: a node fetches each version once, a changed object is fetched
    again, and a crash mid-copy is simply copied again.
    """
    if "://" not in uri or uri.startswith("file://"):
        return os.path.abspath(urlsplit(uri).path if uri.startswith("file://") else uri)
    storage, name = split_uri(uri)
    digest = hashlib.sha256((uri + _fingerprint(storage, name)).encode()).hexdigest()[:16]
    dest = os.path.join(os.fspath(cache_dir), f"{digest}-{name}")
    done = dest + ".complete"
    if not os.path.exists(done):
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        storage.download(name, tmp)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        elif os.path.exists(dest):
            os.unlink(dest)
        os.replace(tmp, dest)
        with open(done, "w") as f:
            f.write(uri + "\n")
    return dest


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """Open a local folder (created if missing) or an S3 prefix; any other scheme is refused."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage {uri!r}: empty URI (use a local path or s3://bucket/prefix)")
    uri = uri.strip()
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        return _open_local(uri)
    if scheme == "s3":
        return _open_s3(uri, endpoint_url)
    raise StorageError(
        f"storage {uri!r}: unsupported scheme {scheme!r} (use a local path or s3://bucket/prefix)"
    )


def _open_local(uri: str) -> Storage:
    path = urlsplit(uri).path if uri.startswith("file://") else os.path.expanduser(uri)
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"storage {path!r}: cannot create the folder ({exc.strerror})") from None
    return Storage(uri=path, filesystem=pafs.LocalFileSystem(), path=path)


def _open_s3(uri: str, endpoint_url: str | None) -> Storage:
    parts = urlsplit(uri)
    bucket = parts.netloc
    if not bucket:
        raise StorageError(f"storage {uri!r}: missing bucket name (use s3://bucket/prefix)")
    if parts.query or parts.fragment:
        raise StorageError(
            f"storage {uri!r}: query parameters are not supported "
            "(pass endpoint_url or set AWS_ENDPOINT_URL)"
        )
    if "@" in bucket or not _BUCKET_RE.match(bucket):
        raise StorageError(f"storage {mask_userinfo(uri)!r}: invalid bucket name {bucket!r}")
    prefix = parts.path.strip("/")
    path = f"{bucket}/{prefix}" if prefix else bucket
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    filesystem = _s3_filesystem(f"s3://{path}", endpoint, fail_fast=False)
    return Storage(uri=f"s3://{path}", filesystem=filesystem, path=path, endpoint_url=endpoint)


def _s3_filesystem(uri: str, endpoint: str | None, fail_fast: bool) -> pafs.S3FileSystem:
    """Build the S3 filesystem; ``fail_fast`` gives one attempt and short timeouts."""
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "connect_timeout": _CHECK_CONNECT_TIMEOUT_S if fail_fast else _CONNECT_TIMEOUT_S,
        "request_timeout": _CHECK_REQUEST_TIMEOUT_S if fail_fast else _REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=1 if fail_fast else _MAX_ATTEMPTS
        ),
    }
    if endpoint:
        kwargs.update(_endpoint_kwargs(uri, endpoint))
    # No keys are passed: the AWS SDK's credential chain reads them (environment, profile,
    # instance role) in whichever process uses the filesystem. Explicit keys would be pickled
    # with it into Ray Train's workers and controller (its storage_filesystem).
    return pafs.S3FileSystem(**kwargs)


def _endpoint_kwargs(uri: str, endpoint: str) -> dict[str, str]:
    """``http://host:port`` → pyarrow's ``endpoint_override`` + ``scheme``."""
    if "://" not in endpoint:
        return {"endpoint_override": endpoint.rstrip("/"), "scheme": "https"}
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise StorageError(
            f"storage {uri!r}: invalid S3 endpoint {mask_userinfo(endpoint)!r} "
            "(expected http(s)://host[:port])"
        )
    return {"endpoint_override": parts.netloc, "scheme": parts.scheme}


def check_storage(storage: Storage) -> None:
    """Preflight: write, read back and delete a marker, so a bad store fails before training.

    Failures become one-line :class:`StorageError`s naming the URI and the cause.
    """
    probe = storage
    if not storage.is_local:
        fast = _s3_filesystem(storage.uri, storage.endpoint_url, fail_fast=True)
        probe = Storage(storage.uri, fast, storage.path, storage.endpoint_url)
    marker = f".dupr-preflight-{uuid.uuid4().hex}"
    payload = b"dupr storage preflight\n"
    try:
        probe.write_bytes(marker, payload)
        if probe.read_bytes(marker) != payload:
            raise StorageError(f"storage {storage.uri!r}: read back different bytes than written")
        probe.filesystem.delete_file(probe.join(marker))
    except StorageError:
        raise
    except PermissionError:
        raise StorageError(
            f"storage {storage.uri!r}: permission denied (cannot write into the folder)"
        ) from None
    except OSError as exc:
        raise StorageError(f"storage {storage.uri!r}: {_explain(storage, exc)}") from None


def _explain(storage: Storage, exc: OSError) -> str:
    """Turn pyarrow's multi-line AWS error into a short cause, without secrets."""
    text = " ".join(str(exc).split())
    match = re.search(r"AWS Error ([A-Z_]+)", text)
    code = match.group(1) if match else ""
    if storage.is_local:
        return scrub_secrets(exc.strerror or text)
    if code not in _S3_CAUSES:
        short = re.search(r"AWS Error (\w+ during \w+) operation: (.*?)(?: \(Request ID|$)", text)
        return scrub_secrets(f"{short.group(1)}: {short.group(2)}" if short else text)
    detail = re.search(r"Details: (.*?)(?:$| \(Request ID)", text)
    if code == "NETWORK_CONNECTION" and "too slow" in text:
        code = "REQUEST_TIMEOUT"
    return _S3_CAUSES[code].format(
        bucket=storage.path.split("/")[0],
        endpoint=mask_userinfo(storage.endpoint_url or "(AWS default)"),
        detail=scrub_secrets(detail.group(1) if detail else "connection failed"),
    )


def ray_storage_args(storage: Storage) -> dict[str, Any]:
    """``storage_path`` + ``storage_filesystem`` for ``ray.train.RunConfig``.

    With an explicit filesystem Ray wants the path inside it (no ``s3://``), which is how a
    custom endpoint reaches the Train controller and workers.
    """
    return {"storage_path": storage.path, "storage_filesystem": storage.filesystem}


def aws_settings() -> dict[str, str]:
    """The endpoint and region variables set here (`AWS_SETTINGS`), never credentials."""
    return {k: os.environ[k] for k in AWS_SETTINGS if os.environ.get(k)}


def secret_env_values() -> list[str]:
    """Values of the secret-bearing environment variables that are set, longest first."""
    names = set(SECRET_ENV_VARS) | {
        k for k in os.environ if k.upper().endswith(_SECRET_ENV_SUFFIXES)
    }
    values = {os.environ.get(n, "") for n in names}
    return sorted((v for v in values if v), key=len, reverse=True)


def contains_secret(text: str, secrets: list[str] | None = None) -> bool:
    """True if ``text`` is a secret env value or contains one.

    Values shorter than 4 characters only count as exact matches: a toy secret like ``s``
    would otherwise mask every message.
    """
    for value in secret_env_values() if secrets is None else secrets:
        if text == value or (len(value) >= _MIN_SUBSTRING_SECRET and value in text):
            return True
    return False


def scrub_secrets(text: str) -> str:
    """Replace secret env values (see :func:`contains_secret`) and URI passwords in ``text``."""
    for value in secret_env_values():
        if text == value:
            return REDACTED
        if len(value) >= _MIN_SUBSTRING_SECRET:
            text = text.replace(value, REDACTED)
    return mask_userinfo(text)


_USERINFO_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)(?P<pw>[^/\s@]+)@")


def check_no_password(name: str, uri: object, instead: str) -> None:
    """Refuse a URI that carries a password (`scheme://user:password@host`).

    A URI is written to configs, MLflow params, Ray's job table and logs; the password belongs
    in the environment (`instead` names the variables). The message masks it.
    """
    if isinstance(uri, str) and mask_userinfo(uri) != uri:
        shown = _USERINFO_RE.sub(lambda m: m.group("head").split("//")[0] + f"//{REDACTED}@", uri)
        raise ConfigError(
            f"{name}={shown!r}: holds credentials; set {instead} in the environment instead"
        )


def mask_userinfo(text: str) -> str:
    """``scheme://user:pw@host`` → ``scheme://user:***REDACTED***@host``."""
    return _USERINFO_RE.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
