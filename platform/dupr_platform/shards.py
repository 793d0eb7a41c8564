"""Parquet shards of encoded images: the data set format for object storage.

Why: millions of small image objects are slow and costly to list and GET one by one from S3, and
a local folder cannot be shared by a cluster. A few large Parquet files, each holding the
original encoded bytes (never re-encoded, so pixels stay exactly what the folder path decodes),
list in one request and read in large ranges. Row groups are kept small so that one image can be
fetched without reading its whole shard, which is what a shuffled sampler needs.

Layout under the destination prefix::

    part-00000.parquet ...   columns id (string), image (binary)[, label (int32)]
    labels.json              class names, position = label (only with labels=True)
    _index.json              written last: shards, per-shard row-group sizes, total, skips
    _manifests/part-*.json   while a build runs: one per finished shard (removed at commit)

Shard N holds the decodable images among positions [N * images_per_shard, (N + 1) *
images_per_shard) of the sorted source listing, so the assignment depends only on the listing
and any process can write any shard: ``python -m dupr_platform.shards SRC DEST`` writes them in
parallel Ray tasks across a cluster (``--single-process`` in one process). Each shard appears
whole (a temp file renamed, or one S3 upload), then its manifest (files, rows, row groups, bytes,
skips and a fingerprint of its inputs) commits it; a rerun after an interruption keeps every
shard whose manifest matches and whose file has the recorded size, and writes the rest.

The index is the commit point of the whole set: it is written with one atomic PUT (S3) or
rename (local) after every shard is complete, and readers refuse a prefix without it. Files
that do not decode are skipped and listed in the index, never fatal.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch.utils.data
from PIL import Image
from torch import Tensor

# Shard rows decode exactly as image files do; tests replace `decode_image` to simulate crashes.
from dupr.data.folder import IMAGE_EXTENSIONS, ImageDecodeError, decode_pixels
from dupr.data.folder import decode_rgb as decode_image
from dupr.io import TEMP_SUFFIX, write_atomically
from dupr_platform.progress import Progress
from dupr_platform.storage import Storage, StorageError, check_storage, open_storage
from dupr_platform.text import one_line

__all__ = [
    "INDEX_NAME",
    "LABELS_NAME",
    "SCHEMA_VERSION",
    "ParquetImageDataset",
    "ShardError",
    "ShardIndex",
    "ShardIndexError",
    "ShardInfo",
    "ShardPlan",
    "ShardRecord",
    "decode_image",
    "plan_shards",
    "prepare_shards",
    "write_shards",
]

log = logging.getLogger(__name__)

FORMAT = "dupr-parquet-images"
SCHEMA_VERSION = 1
INDEX_NAME = "_index.json"
LABELS_NAME = "labels.json"
MANIFEST_DIR = "_manifests"  # one JSON per finished shard while a build is in progress
_SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")

T = TypeVar("T")
R = TypeVar("R")


class ShardError(ValueError):
    """A shard set that cannot be written or read; the message is one line naming the URI."""


class ShardIndexError(ShardError):
    """A missing or malformed ``_index.json``."""


def _schema(labels: bool) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False)]
    fields.append(pa.field("image", pa.binary(), nullable=False))
    if labels:
        fields.append(pa.field("label", pa.int32(), nullable=False))
    return pa.schema(fields, metadata={"dupr.format": FORMAT, "dupr.schema": str(SCHEMA_VERSION)})


# --------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file: its name under the prefix, rows, rows per row group and size in bytes."""

    path: str
    rows: int
    row_groups: tuple[int, ...]
    bytes: int


@dataclass
class ShardIndex:
    """Contents of ``_index.json``: everything a reader needs to map an index to a row."""

    source: str
    source_fingerprint: str
    images_per_shard: int
    row_group_size: int
    labels: bool
    total: int
    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)
    classes: list[str] | None = None
    schema_version: int = SCHEMA_VERSION
    uri: str = field(default="", compare=False)  # where it was read from; not serialized

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "source": self.source,
            "source_fingerprint": self.source_fingerprint,
            "images_per_shard": self.images_per_shard,
            "row_group_size": self.row_group_size,
            "labels": self.labels,
            "classes": self.classes,
            "columns": _schema(self.labels).names,
            "total": self.total,
            "shards": [
                {"path": s.path, "rows": s.rows, "row_groups": list(s.row_groups), "bytes": s.bytes}
                for s in self.shards
            ],
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Any, uri: str) -> ShardIndex:
        """Parse and check an index; anything inconsistent is a one-line ``ShardIndexError``."""
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} index")
            version = data["schema_version"]
            if version != SCHEMA_VERSION:
                raise ValueError(f"schema_version {version!r}, this code reads {SCHEMA_VERSION}")
            shards = []
            for entry in data["shards"]:
                groups = tuple(int(n) for n in entry["row_groups"])
                info = ShardInfo(
                    str(entry["path"]), int(entry["rows"]), groups, int(entry["bytes"])
                )
                if not _SHARD_RE.match(info.path):
                    raise ValueError(f"bad shard name {info.path!r}")
                if info.rows < 1 or any(n < 1 for n in groups) or sum(groups) != info.rows:
                    raise ValueError(f"shard {info.path}: row groups {groups} != {info.rows} rows")
                shards.append(info)
            total = int(data["total"])
            if total != sum(s.rows for s in shards):
                raise ValueError(f"total {total} != sum of shard rows")
            labels = bool(data["labels"])
            classes: list[str] | None = None
            if labels:
                classes = data.get("classes")
                if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                    raise ValueError("labels=true but no class list")
            skipped = [{"id": str(s["id"]), "reason": str(s["reason"])} for s in data["skipped"]]
            return cls(
                source=str(data["source"]),
                source_fingerprint=str(data["source_fingerprint"]),
                images_per_shard=int(data["images_per_shard"]),
                row_group_size=int(data["row_group_size"]),
                labels=labels,
                total=total,
                shards=shards,
                skipped=skipped,
                classes=classes,
                schema_version=version,
                uri=uri,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else one_line(exc)
            raise ShardIndexError(f"malformed shard index {uri}: {detail}") from None

    @classmethod
    def load(cls, storage: Storage, prefix: str = "") -> ShardIndex:
        """Read ``<prefix>/_index.json``; missing or malformed → one-line ``ShardIndexError``."""
        rel = f"{prefix.strip('/')}/{INDEX_NAME}" if prefix.strip("/") else INDEX_NAME
        uri = storage.uri_for(rel)
        try:
            raw = storage.read_bytes(rel)
        except FileNotFoundError:
            raise ShardIndexError(
                f"no shard index {uri}: not a shard set, or prepare_shards did not finish"
            ) from None
        except (OSError, StorageError) as exc:
            raise ShardIndexError(f"cannot read shard index {uri}: {one_line(exc)}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ShardIndexError(f"malformed shard index {uri}: {one_line(exc)}") from None
        return cls.from_json(data, uri)

    @cached_property
    def _group_starts(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Global index of each row group's first row, and its (shard, group) position."""
        starts: list[int] = []
        where: list[tuple[int, int]] = []
        offset = 0
        for s, shard in enumerate(self.shards):
            for g, n in enumerate(shard.row_groups):
                starts.append(offset)
                where.append((s, g))
                offset += n
        return starts, where

    def locate(self, index: int) -> tuple[int, int, int]:
        """Global image index → (shard number, row group in that shard, row in that group)."""
        if not 0 <= index < self.total:
            raise IndexError(f"image index {index} out of range for {self.total} images")
        starts, where = self._group_starts
        k = bisect.bisect_right(starts, index) - 1
        shard, group = where[k]
        return shard, group, index - starts[k]

    def summary(self) -> str:
        groups = sum(len(s.row_groups) for s in self.shards)
        size = sum(s.bytes for s in self.shards)
        lines = [
            f"{self.total} images in {len(self.shards)} shards ({groups} row groups of up to "
            f"{self.row_group_size} rows, {size / 2**20:.1f} MiB) at {self.uri or '?'}",
            f"source: {self.source}",
            f"labels: {len(self.classes or [])} classes" if self.labels else "labels: none",
            f"skipped: {len(self.skipped)} undecodable files",
        ]
        lines += [f"  {s['id']}: {s['reason']}" for s in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more (see {INDEX_NAME})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _SourceFile:
    id: str
    path: str  # inside the source filesystem
    size: int
    mtime_ns: int


def _open_source(source: str) -> Storage:
    """Open the source without creating it (``open_storage`` creates missing local folders)."""
    if "://" not in source or source.startswith("file://"):
        local = source[len("file://") :] if source.startswith("file://") else source
        local = os.path.abspath(os.path.expanduser(local))
        if not os.path.exists(local):
            raise ShardError(f"source {local} does not exist")
        if not os.path.isdir(local):
            raise ShardError(f"source {local} is not a folder")
    try:
        return open_storage(source)
    except StorageError as exc:
        raise ShardError(f"source: {exc}") from None


def _list_source(storage: Storage) -> list[_SourceFile]:
    """Image files under the source, hidden names skipped, sorted like ``list_image_files``."""
    selector = pafs.FileSelector(storage.path, recursive=True, allow_not_found=True)
    try:
        infos = storage.filesystem.get_file_info(selector)
    except OSError as exc:
        raise ShardError(f"cannot list source {storage.uri}: {one_line(exc)}") from None
    base = storage.path.rstrip("/") + "/"
    files = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(base):
            continue
        rel = info.path[len(base) :]
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        if os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
            continue
        files.append(_SourceFile(rel, info.path, info.size or 0, info.mtime_ns or 0))
    files.sort(key=lambda f: tuple(f.id.split("/")))
    if not files:
        raise ShardError(
            f"source {storage.uri} contains no image files "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}, hidden files ignored)"
        )
    return files


def _fingerprint(files: Iterable[_SourceFile]) -> str:
    """Changes when a file is added, removed, resized or rewritten, so re-runs notice it."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.id}\0{f.size}\0{f.mtime_ns}\n".encode())
    return digest.hexdigest()


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` over a thread pool, in order, with a bounded window so memory stays flat."""
    window = 4 * workers
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shards") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass(frozen=True)
class _Chunk:
    """The source files of one shard: ``part-NNNNN.parquet`` holds the decodable ones among
    listing positions ``[N * images_per_shard, (N + 1) * images_per_shard)``, so the same
    listing gives the same assignment whichever process writes the shard, and a resumed run
    knows which shards it still lacks."""

    number: int
    files: tuple[_SourceFile, ...]
    labels: tuple[int, ...]  # -1 each without labels
    fingerprint: str  # of the files, their labels and the settings that shape the shard

    @property
    def name(self) -> str:
        return f"part-{self.number:05d}.parquet"

    @property
    def manifest(self) -> str:
        return f"{MANIFEST_DIR}/{self.name}.json"


@dataclass
class ShardPlan:
    """What ``write_shards`` will do, decided before any image is read or Ray is started, so
    that bad input (no source, no images, an unwritable destination) fails first."""

    source: Storage
    dest: Storage
    images_per_shard: int
    row_group_size: int
    labels: bool
    source_fingerprint: str
    chunks: list[_Chunk]
    classes: list[str] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # known before reading
    up_to_date: ShardIndex | None = None  # a complete index for the same input: nothing to do

    @property
    def num_files(self) -> int:
        return sum(len(c.files) for c in self.chunks)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ShardError(f"{name} must be a positive integer, got {value!r}")


def plan_shards(
    source: str,
    dest: str,
    images_per_shard: int = 1000,
    row_group_size: int = 64,
    labels: bool = False,
) -> ShardPlan:
    """List ``source``, check ``dest`` and split the listing into shards; reads no image.

    Raises a one-line ``ShardError`` for a missing source, one without images, or a
    destination that cannot be created or written.
    """
    _check_positive(images_per_shard=images_per_shard, row_group_size=row_group_size)
    src = _open_source(source)
    files = _list_source(src)
    fingerprint = _fingerprint(files)
    try:
        out = open_storage(dest)
    except StorageError as exc:
        raise ShardError(f"dest: {exc}") from None
    plan = ShardPlan(src, out, images_per_shard, row_group_size, labels, fingerprint, chunks=[])

    if out.exists(INDEX_NAME):
        try:
            old: ShardIndex | None = ShardIndex.load(out)
        except ShardIndexError as exc:
            log.warning("rebuilding: %s", exc)
            old = None
        if old is not None and old.source == src.uri and _is_complete(out, old):
            same = (
                old.source_fingerprint == fingerprint
                and old.images_per_shard == images_per_shard
                and old.row_group_size == row_group_size
                and old.labels == labels
            )
            if same:
                plan.up_to_date = old
                return plan
        log.info("shards at %s are stale or incomplete; rebuilding", out.uri)
    try:
        check_storage(out)
    except StorageError as exc:
        raise ShardError(f"dest: {exc}") from None

    class_of: dict[str, int] = {}
    if labels:
        plan.classes = sorted({f.id.split("/")[0] for f in files if "/" in f.id})
        class_of = {name: k for k, name in enumerate(plan.classes)}
        plan.skipped = [
            {"id": f.id, "reason": "not inside a class folder (labels=True)"}
            for f in files
            if "/" not in f.id
        ]
        files = [f for f in files if "/" in f.id]
        if not plan.classes:
            raise ShardError(f"source {src.uri} has no class folders (labels=True)")
    settings = f"{SCHEMA_VERSION}\0{images_per_shard}\0{row_group_size}\0{labels}\n"
    for number, start in enumerate(range(0, len(files), images_per_shard)):
        part = tuple(files[start : start + images_per_shard])
        part_labels = tuple(class_of.get(f.id.split("/")[0], -1) for f in part)
        digest = hashlib.sha256(settings.encode())
        digest.update(_fingerprint(part).encode())
        digest.update(repr(part_labels).encode())
        plan.chunks.append(_Chunk(number, part, part_labels, digest.hexdigest()))
    return plan


def _write_chunk(
    source: Storage,
    dest: Storage,
    chunk: _Chunk,
    row_group_size: int,
    labels: bool,
    read_threads: int = 4,
    decode_threads: int = 1,
) -> dict[str, Any]:
    """Write one shard whole (local: temp file + rename; S3: one upload), then its manifest.

    Every file is read (``read_threads`` overlap object-store latency) and fully decoded
    (``decode_threads``, the CPU cost) so undecodable ones are skipped and listed instead of
    failing a training run later. The manifest, written last, is the shard's commit point.
    """
    schema = _schema(labels)
    skipped: list[dict[str, str]] = []

    def read(item: tuple[_SourceFile, int]) -> tuple[_SourceFile, int, bytes]:
        f, label = item
        try:
            with source.filesystem.open_input_stream(f.path) as stream:
                return f, label, stream.read()
        except OSError as exc:
            raise ShardError(f"cannot read {source.uri_for(f.id)}: {one_line(exc)}") from None

    def check(item: tuple[_SourceFile, int, bytes]) -> tuple[_SourceFile, int, bytes, str | None]:
        f, label, data = item
        try:
            decode_image(data, f.id)
        except ImageDecodeError as exc:
            return f, label, data, exc.reason
        return f, label, data, None

    def tables() -> Iterator[pa.Table]:
        fetched = _ordered_map(read, zip(chunk.files, chunk.labels, strict=True), read_threads)
        checked = (
            _ordered_map(check, fetched, decode_threads)
            if decode_threads > 1
            else map(check, fetched)
        )
        rows: list[tuple[str, bytes, int]] = []
        for f, label, data, error in checked:
            if error is not None:
                log.warning("skipping undecodable image %s: %s", source.uri_for(f.id), error)
                skipped.append({"id": f.id, "reason": error})
                continue
            rows.append((f.id, data, label))
            if len(rows) == row_group_size:
                yield _table(rows, schema)
                rows = []
        if rows:
            yield _table(rows, schema)

    groups: list[int] = []
    parts = tables()
    first = next(parts, None)
    size = 0
    if first is not None:

        def write(sink: Any) -> None:
            with pq.ParquetWriter(
                sink,
                schema,
                compression="none",  # images are already compressed; ids are tiny
                use_dictionary=False,
                write_statistics=False,  # min/max of image blobs would only bloat the footer
            ) as writer:
                for table in itertools.chain([first], parts):
                    writer.write_table(table, row_group_size=table.num_rows)
                    groups.append(table.num_rows)

        path = dest.join(chunk.name)
        if dest.is_local:
            write_atomically(path, write)
        else:  # an S3 object appears when its (multipart) upload completes
            with dest.filesystem.open_output_stream(path) as out:
                write(out)
        size = dest.filesystem.get_file_info(path).size or 0
        log.info("wrote %s (%d images)", dest.uri_for(chunk.name), sum(groups))
    manifest = {
        "path": chunk.name,
        "rows": sum(groups),
        "row_groups": groups,
        "bytes": size,
        "files": len(chunk.files),
        "skipped": skipped,
        "fingerprint": chunk.fingerprint,
    }
    dest.write_json(chunk.manifest, manifest)
    return manifest


def _table(rows: list[tuple[str, bytes, int]], schema: pa.Schema) -> pa.Table:
    columns: dict[str, list[Any]] = {"id": [r[0] for r in rows], "image": [r[1] for r in rows]}
    if "label" in schema.names:
        columns["label"] = [r[2] for r in rows]
    return pa.Table.from_pydict(columns, schema=schema)


def _is_complete(dest: Storage, index: ShardIndex) -> bool:
    """Every shard the index lists exists with the recorded size (one metadata call each)."""
    paths = [dest.join(s.path) for s in index.shards]
    try:
        infos = dest.filesystem.get_file_info(paths)
    except OSError:
        return False
    return all(
        info.type == pafs.FileType.File and info.size == shard.bytes
        for info, shard in zip(infos, index.shards, strict=True)
    )


def _complete_chunks(plan: ShardPlan) -> dict[int, dict[str, Any]]:
    """Manifests of shards an interrupted run finished for this very plan: the same files,
    labels and settings (fingerprint), and the shard file present with the recorded size."""
    out = plan.dest
    present = set(out.list(MANIFEST_DIR))
    chunks = [c for c in plan.chunks if f"{c.name}.json" in present]

    def read(chunk: _Chunk) -> dict[str, Any] | None:
        try:
            manifest = out.read_json(chunk.manifest)
        except (OSError, ValueError):
            return None
        ok = (
            isinstance(manifest, dict)
            and manifest.get("fingerprint") == chunk.fingerprint
            and manifest.get("path") == chunk.name
            and isinstance(manifest.get("rows"), int)
        )
        return manifest if ok else None

    found: dict[int, dict[str, Any]] = {}
    for chunk, manifest in zip(chunks, _ordered_map(read, chunks, 16), strict=True):
        if manifest is not None:
            found[chunk.number] = manifest
    with_rows = [(n, m) for n, m in found.items() if m["rows"] > 0]
    infos = out.filesystem.get_file_info([out.join(m["path"]) for _, m in with_rows])
    for (number, manifest), info in zip(with_rows, infos, strict=True):
        if info.type != pafs.FileType.File or info.size != manifest["bytes"]:
            del found[number]
    return found


def write_shards(
    plan: ShardPlan,
    *,
    workers: int = 4,
    parallel: bool = False,
    cpus_per_task: float = 1.0,
    read_threads: int = 4,
    progress: bool = False,
    progress_every_s: float = 10.0,
) -> ShardIndex:
    """Write the shards a plan lacks, then the index (the commit point); return the index.

    ``parallel``: one Ray task per shard (``cpus_per_task`` CPUs each) on the cluster this
    process is connected to (or a local instance Ray starts); else in this process with
    ``workers`` threads. Shards a run finished before an interruption (their manifests match)
    are kept; the result is the same either way. ``progress`` prints images/s to stdout.
    """
    _check_positive(workers=workers, read_threads=read_threads)
    if plan.up_to_date is not None:
        log.info("shards at %s are up to date; nothing to do", plan.dest.uri)
        return plan.up_to_date
    out = plan.dest
    if out.exists(INDEX_NAME):
        # Withdraw the old index first: readers must fail clearly, not mix old and new shards.
        out.filesystem.delete_file(out.join(INDEX_NAME))
    done = _complete_chunks(plan)
    todo = [c for c in plan.chunks if c.number not in done]
    files_done = sum(m["files"] for m in done.values())
    if done:
        log.info("resuming: %d of %d shards already complete", len(done), len(plan.chunks))
    meter = None
    if progress:
        meter = Progress("shards", plan.num_files, "images", progress_every_s, done=files_done)
        if done:
            print(f"[shards] {len(done)} of {len(plan.chunks)} shards already complete: kept")
        meter.update(files_done)

    def finished(manifest: dict[str, Any], chunk: _Chunk) -> None:
        nonlocal files_done
        done[chunk.number] = manifest
        files_done += manifest["files"]
        if meter is not None:
            meter.update(files_done, {"shards": len(done)})

    if parallel:
        _write_on_ray(plan, todo, finished, cpus_per_task, read_threads)
    else:
        for chunk in todo:
            args = (plan.row_group_size, plan.labels, workers, workers)
            finished(_write_chunk(plan.source, out, chunk, *args), chunk)
    return _commit(plan, [done[c.number] for c in plan.chunks])


def _write_on_ray(
    plan: ShardPlan,
    todo: list[_Chunk],
    finished: Callable[[dict[str, Any], _Chunk], None],
    cpus_per_task: float,
    read_threads: int,
) -> None:
    """One Ray task per shard, a bounded number in flight; a failed task stops the run (the
    shards already finished stay committed by their manifests)."""
    import ray

    from dupr_platform.cluster import COMPUTE_PRIORITY, forwarded_env

    task = ray.remote(_write_chunk).options(
        num_cpus=cpus_per_task,
        max_retries=3,  # a lost worker or node: a shard is rewritten whole, so retrying is safe
        runtime_env={"env_vars": forwarded_env() | COMPUTE_PRIORITY},
    )
    decode_threads = max(1, round(cpus_per_task))
    window = max(2, int(2 * ray.cluster_resources().get("CPU", 1) / cpus_per_task))
    queue = iter(todo)
    pending: dict[Any, _Chunk] = {}
    try:
        while True:
            while len(pending) < window and (chunk := next(queue, None)) is not None:
                ref = task.remote(
                    plan.source,
                    plan.dest,
                    chunk,
                    plan.row_group_size,
                    plan.labels,
                    read_threads,
                    decode_threads,
                )
                pending[ref] = chunk
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                chunk = pending.pop(ref)
                try:
                    manifest = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, ShardError):  # one line, as in a single process
                        raise ShardError(str(exc.cause)) from None
                    raise
                finished(manifest, chunk)
    finally:
        for ref in pending:
            ray.cancel(ref)


def _commit(plan: ShardPlan, manifests: list[dict[str, Any]]) -> ShardIndex:
    """Write labels and the index, the commit point, once every shard is complete."""
    out = plan.dest
    shards = [
        ShardInfo(m["path"], int(m["rows"]), tuple(m["row_groups"]), int(m["bytes"]))
        for m in manifests
        if m["rows"] > 0
    ]
    skipped = plan.skipped + [s for m in manifests for s in m["skipped"]]
    total = sum(s.rows for s in shards)
    if total == 0:
        first = f" (first: {skipped[0]['id']}: {skipped[0]['reason']})" if skipped else ""
        raise ShardError(
            f"source {plan.source.uri}: none of {len(skipped)} image files decode{first}"
        )

    # Shards of an earlier, larger build (and temp files of killed writers) would linger.
    keep = {s.path for s in shards}
    for name in out.list():
        stale = _SHARD_RE.match(name) and name not in keep
        if stale or (name.startswith(".part-") and name.endswith(TEMP_SUFFIX)):
            out.filesystem.delete_file(out.join(name))
    if plan.labels:
        out.write_json(LABELS_NAME, plan.classes)
    elif out.exists(LABELS_NAME):
        out.filesystem.delete_file(out.join(LABELS_NAME))

    index = ShardIndex(
        source=plan.source.uri,
        source_fingerprint=plan.source_fingerprint,
        images_per_shard=plan.images_per_shard,
        row_group_size=plan.row_group_size,
        labels=plan.labels,
        total=total,
        shards=shards,
        skipped=skipped,
        classes=plan.classes,
    )
    out.write_json(INDEX_NAME, index.to_json())  # last: the commit point
    out.delete(MANIFEST_DIR, recursive=True)  # the index now records every shard
    index.uri = out.uri_for(INDEX_NAME)
    log.info("wrote %s: %d images, %d skipped", index.uri, total, len(skipped))
    return index


def prepare_shards(
    source: str,
    dest: str,
    images_per_shard: int = 1000,
    row_group_size: int = 64,
    labels: bool = False,
    workers: int = 4,
    *,
    parallel: bool = False,
    progress: bool = False,
) -> ShardIndex:
    """Pack the image files under ``source`` into Parquet shards under ``dest``; return the index.

    ``source`` and ``dest`` are local folders or ``s3://bucket/prefix``. Every file is read and
    fully decoded once so that undecodable ones are skipped and listed in the index instead of
    failing a training run later. With ``labels``, each image's label is the position of its
    first-level folder name in the sorted class list (``labels.json``). A complete index for
    the same source contents and settings is returned without rewriting; an interrupted run
    resumes, keeping the shards it finished. ``parallel`` writes them in Ray tasks
    (``plan_shards`` and ``write_shards`` separate the checks from the work).
    """
    plan = plan_shards(source, dest, images_per_shard, row_group_size, labels)
    return write_shards(plan, workers=workers, parallel=parallel, progress=progress)


# --------------------------------------------------------------------------------------------
# Reading


class ShardRecord(NamedTuple):
    """One stored row: the image id, its original encoded bytes and its label (or None)."""

    id: str
    image: bytes
    label: int | None


def _fresh_filesystem(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """A new filesystem with the same settings: a forked child must not share S3 connections."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return filesystem
    return pickle.loads(pickle.dumps(filesystem))


class ParquetImageDataset(torch.utils.data.Dataset):
    """Images of a shard set, by global index; the same interface as ``ImageFolderDataset``.

    ``load(i)`` reads the one row group holding image ``i`` (kept in a small per-process LRU
    cache, since a row group serves ``row_group_size`` neighbouring indices) and decodes it like
    the folder path. Picklable for DataLoader workers: open files and caches are not pickled and
    are reopened lazily in each process, also after a fork.
    """

    def __init__(
        self, uri_or_storage: str | Storage, cache_row_groups: int = 8, open_files: int = 4
    ) -> None:
        if cache_row_groups < 1 or open_files < 1:
            raise ValueError("cache_row_groups and open_files must be >= 1")
        if isinstance(uri_or_storage, Storage):
            storage = uri_or_storage
        else:
            uri = uri_or_storage
            if "://" not in uri and not os.path.isdir(os.path.expanduser(uri)):
                raise ShardIndexError(f"no shard index {os.path.join(uri, INDEX_NAME)}: no folder")
            try:
                storage = open_storage(uri)
            except StorageError as exc:
                raise ShardIndexError(f"shard set: {exc}") from None
        self.storage = storage
        self.index = ShardIndex.load(storage)
        self.uri: str = storage.uri
        self.root: str = storage.uri
        self.classes: list[str] | None = self.index.classes
        self.cache_row_groups, self.open_files = cache_row_groups, open_files
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._files: OrderedDict[int, tuple[Any, pq.ParquetFile]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_pid", "_cache", "_files"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.index.total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uri={self.uri!r}, num_images={len(self)})"

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked DataLoader worker: drop the parent's handles
            self.storage = dataclasses.replace(
                self.storage, filesystem=_fresh_filesystem(self.storage.filesystem)
            )
            self._reset()

    def _parquet_file(self, shard: int) -> pq.ParquetFile:
        entry = self._files.get(shard)
        if entry is not None:
            self._files.move_to_end(shard)
            return entry[1]
        info = self.index.shards[shard]
        uri = self.storage.uri_for(info.path)
        try:
            handle = self.storage.filesystem.open_input_file(self.storage.join(info.path))
            parquet = pq.ParquetFile(handle, pre_buffer=True)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(
                f"cannot open shard {uri}: {one_line(exc)} (re-run prepare_shards)"
            ) from None
        groups = tuple(
            parquet.metadata.row_group(k).num_rows for k in range(parquet.metadata.num_row_groups)
        )
        if groups != info.row_groups:
            handle.close()
            raise ShardError(
                f"shard {uri} does not match {INDEX_NAME} (row groups {groups} != "
                f"{info.row_groups}); re-run prepare_shards"
            )
        self._files[shard] = (handle, parquet)
        while len(self._files) > self.open_files:
            _, (old, _) = self._files.popitem(last=False)
            old.close()
        return parquet

    def _row_group(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        table = self._cache.get(key)
        if table is not None:
            self._cache.move_to_end(key)
            return table
        parquet = self._parquet_file(shard)
        try:
            table = parquet.read_row_group(group, use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            uri = self.storage.uri_for(self.index.shards[shard].path)
            raise ShardError(
                f"cannot read row group {group} of shard {uri}: {one_line(exc)}"
            ) from None
        self._cache[key] = table
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return table

    def _position(self, index: int) -> tuple[int, int, int]:
        if index < 0:
            index += len(self)
        return self.index.locate(index)

    def record(self, index: int) -> ShardRecord:
        """The stored row of image ``index``: id, original bytes, label (None without labels)."""
        self._check_process()
        shard, group, row = self._position(index)
        table = self._row_group(shard, group)
        label = table.column("label")[row].as_py() if "label" in table.column_names else None
        return ShardRecord(
            table.column("id")[row].as_py(), table.column("image")[row].as_py(), label
        )

    def load(self, index: int) -> Image.Image:
        """The ``index``-th image in RGB; raises ``ImageDecodeError`` if its bytes do not decode."""
        rec = self.record(index)
        try:
            return decode_image(rec.image, rec.id)
        except ImageDecodeError as err:
            raise self._in_shard(index, err) from err

    def load_pixels(self, index: int) -> Tensor:
        """The ``index``-th image as (3, H, W) uint8 pixels (``decode_pixels``), what the
        pre-training views are cut from; raises ``ImageDecodeError`` as ``load`` does."""
        rec = self.record(index)
        try:
            return decode_pixels(rec.image, rec.id)
        except ImageDecodeError as err:
            raise self._in_shard(index, err) from err

    def _in_shard(self, index: int, err: ImageDecodeError) -> ImageDecodeError:
        shard, _, _ = self._position(index)
        where = self.storage.uri_for(self.index.shards[shard].path)
        return ImageDecodeError(err.path, f"{err.reason} (in shard {where})")

    def __getitem__(self, index: int) -> Image.Image:
        return self.load(index)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    """The command line: checks (exit status 2, one line) before Ray starts, then the work."""
    parser = argparse.ArgumentParser(
        prog="python -m dupr_platform.shards",
        description="Pack an image folder (local or s3://) into Parquet shards (local or s3://), "
        "in parallel Ray tasks on the cluster in RAY_ADDRESS or a local Ray instance. "
        "Run it again after an interruption: finished shards are kept.",
    )
    parser.add_argument("source", help="folder or s3://bucket/prefix of image files")
    parser.add_argument("dest", help="folder or s3://bucket/prefix for the shards")
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--row-group-size", type=int, default=64)
    parser.add_argument(
        "--labels", action="store_true", help="label = first-level folder (class) name"
    )
    parser.add_argument(
        "--single-process", action="store_true", help="one process with threads, without Ray"
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="reader/decoder threads of --single-process"
    )
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per Ray task")
    args = parser.parse_args(argv)

    from dupr_platform.cli import run_cli  # it imports this module
    from dupr_platform.cluster import start_ray

    def load() -> ShardPlan:
        if args.cpus_per_task <= 0:
            raise ShardError(f"--cpus-per-task must be > 0, got {args.cpus_per_task}")
        return plan_shards(
            args.source,
            args.dest,
            images_per_shard=args.images_per_shard,
            row_group_size=args.row_group_size,
            labels=args.labels,
        )

    def run(plan: ShardPlan) -> None:
        parallel = not args.single_process and plan.up_to_date is None
        if parallel:
            start_ray("shards")
        index = write_shards(
            plan,
            workers=args.workers,
            parallel=parallel,
            cpus_per_task=args.cpus_per_task,
            progress=True,
        )
        print(index.summary(), flush=True)

    return run_cli(load, run, lambda plan: "shards")


if __name__ == "__main__":
    sys.exit(main())
