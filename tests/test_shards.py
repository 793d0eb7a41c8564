"""Parquet image shards: folder → shards → images, locally and on a real S3-protocol server."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dupr.data import ImageDecodeError, ImageFolderDataset, build_bundled_image_folder
from dupr.data.two_views import TwoViewDataset, build_loader
from dupr.views import TwoViews
from dupr_platform import shards as shards_module
from dupr_platform.shards import (
    INDEX_NAME,
    LABELS_NAME,
    MANIFEST_DIR,
    ParquetImageDataset,
    ShardError,
    ShardIndex,
    ShardIndexError,
    main,
    prepare_shards,
)
from dupr_platform.storage import open_storage
from services import list_keys, make_bucket, s3_client

NUM_IMAGES = 30
CORRUPT = "zz-broken/corrupt.jpg"  # sorts last: every good image keeps its folder index
SMALL = dict(images_per_shard=8, row_group_size=3, workers=2)


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 bundled JPEGs in photo subfolders (built once for the module; tests must not edit)."""
    return build_bundled_image_folder(tmp_path_factory.mktemp("bundled") / "set", NUM_IMAGES)


@pytest.fixture
def folder(clean_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the set plus one file that has a JPEG name but does not decode."""
    root = tmp_path / "src"
    shutil.copytree(clean_folder, root)
    (root / CORRUPT).parent.mkdir()
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _rel_ids(dataset: ImageFolderDataset) -> list[str]:
    return [p.relative_to(dataset.root).as_posix() for p in dataset.paths]


def _one_line(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _stamp(path: Path) -> tuple[int, int]:
    """Inode and modification time: a file rewritten (even atomically) gets new ones."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _upload(endpoint: str, bucket: str, root: Path, prefix: str) -> None:
    client = s3_client(endpoint)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def _objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Keys under ``prefix`` but the empty "folder/" markers pyarrow leaves when it deletes
    (here: the shard manifests at commit)."""
    return [key for key in list_keys(endpoint, bucket, prefix) if not key.endswith("/")]


def _assert_same_images(shards: ParquetImageDataset, folder_ds: ImageFolderDataset) -> None:
    """Same ids in the same order, byte-identical records, pixel-identical decoding."""
    ids = _rel_ids(folder_ds)
    assert len(shards) == len(ids)
    for i, image_id in enumerate(ids):
        rec = shards.record(i)
        assert rec.id == image_id
        assert rec.image == folder_ds.paths[i].read_bytes()
        got, want = shards.load(i), folder_ds.load(i)
        assert got.mode == "RGB" and got.size == want.size
        assert np.array_equal(np.asarray(got), np.asarray(want)), image_id
        assert torch.equal(shards.load_pixels(i), folder_ds.load_pixels(i)), image_id


def test_local_round_trip_is_byte_and_pixel_identical(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    index = prepare_shards(str(folder), str(dest), **SMALL)

    assert index.total == NUM_IMAGES
    assert index.skipped == [{"id": CORRUPT, "reason": index.skipped[0]["reason"]}]
    assert index.skipped[0]["reason"].startswith("OSError")  # truncated JPEG
    assert [s.rows for s in index.shards] == [8, 8, 8, 6]
    assert [s.row_groups for s in index.shards] == [(3, 3, 2)] * 3 + [(3, 3)]
    assert sorted(os.listdir(dest)) == [INDEX_NAME] + [f"part-0000{k}.parquet" for k in range(4)]

    on_disk = json.loads((dest / INDEX_NAME).read_text())
    assert on_disk["source"] == str(folder) and on_disk["total"] == NUM_IMAGES
    assert on_disk["schema_version"] == shards_module.SCHEMA_VERSION
    assert on_disk["shards"][0] == {
        "path": "part-00000.parquet",
        "rows": 8,
        "row_groups": [3, 3, 2],
        "bytes": (dest / "part-00000.parquet").stat().st_size,
    }
    # The index is written after every shard.
    index_mtime = (dest / INDEX_NAME).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= index_mtime for p in dest.glob("part-*.parquet"))

    parquet = pq.ParquetFile(dest / "part-00000.parquet")
    assert parquet.schema_arrow.names == ["id", "image"]
    assert parquet.schema_arrow.field("image").type == pa.binary()
    assert parquet.metadata.num_row_groups == 3

    dataset = ParquetImageDataset(str(dest))
    assert dataset.uri == dataset.root == str(dest) and dataset.classes is None
    assert ShardIndex.load(open_storage(str(dest))) == index
    folder_ds = ImageFolderDataset(folder)
    assert _rel_ids(folder_ds)[-1] == CORRUPT
    folder_ds.paths = folder_ds.paths[:-1]  # the folder path would skip it at training time
    _assert_same_images(dataset, folder_ds)
    assert dataset.record(-1).id == _rel_ids(folder_ds)[-1]
    with pytest.raises(IndexError):
        dataset.load(NUM_IMAGES)


def test_rerun_is_idempotent_and_rebuilds_on_change(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    first = prepare_shards(str(folder), str(dest), **SMALL)
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}

    again = prepare_shards(str(folder), str(dest), **SMALL)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps  # nothing rewritten

    # Other settings: rebuilt, and shards of the larger earlier build do not linger.
    bigger = prepare_shards(str(folder), str(dest), images_per_shard=16, row_group_size=4)
    assert [s.rows for s in bigger.shards] == [16, 14]
    assert sorted(p.name for p in dest.glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert len(ParquetImageDataset(str(dest))) == NUM_IMAGES

    # Source contents changed (a file removed): rebuilt too.
    gone = sorted(folder.rglob("*.jpg"))[0]
    gone.unlink()
    smaller = prepare_shards(str(folder), str(dest), images_per_shard=16, row_group_size=4)
    assert smaller.total == NUM_IMAGES - 1
    assert smaller.source_fingerprint != bigger.source_fingerprint

    # A shard that went missing makes the old index incomplete: rebuilt, not returned.
    (dest / "part-00001.parquet").unlink()
    repaired = prepare_shards(str(folder), str(dest), images_per_shard=16, row_group_size=4)
    assert repaired == smaller and (dest / "part-00001.parquet").exists()


def test_index_is_the_commit_point(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "shards"
    real_decode = shards_module.decode_image
    calls = {"n": 0}

    def failing_decode(data: bytes, name: str):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("simulated crash")
        return real_decode(data, name)

    monkeypatch.setattr(shards_module, "decode_image", failing_decode)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_shards(str(folder), str(dest), **SMALL)
    assert list(dest.glob("part-*.parquet")) and not (dest / INDEX_NAME).exists()
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(str(dest))
    _one_line(excinfo, "no shard index", str(dest / INDEX_NAME), "did not finish")

    # Shards 0 and 1 (16 decodes) were complete before the crash: the rerun keeps them.
    assert sorted(p.name for p in (dest / MANIFEST_DIR).iterdir()) == [
        "part-00000.parquet.json",
        "part-00001.parquet.json",
    ]
    kept = {name: _stamp(dest / name) for name in ("part-00000.parquet", "part-00001.parquet")}
    monkeypatch.setattr(shards_module, "decode_image", real_decode)
    assert prepare_shards(str(folder), str(dest), **SMALL) == prepare_shards(
        str(folder), str(tmp_path / "reference"), **SMALL
    )
    assert {name: _stamp(dest / name) for name in kept} == kept
    assert len(ParquetImageDataset(str(dest))) == NUM_IMAGES
    assert not (dest / MANIFEST_DIR).exists()  # the index records every shard now
    (dest / INDEX_NAME).unlink()  # deleting the index withdraws the whole set
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(str(dest))
    _one_line(excinfo, str(dest / INDEX_NAME))


def test_malformed_index_and_bad_sources_are_one_line_errors(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    prepare_shards(str(folder), str(dest), **SMALL)
    good = json.loads((dest / INDEX_NAME).read_text())

    (dest / INDEX_NAME).write_text("{not json")
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(str(dest))
    _one_line(excinfo, "malformed shard index", str(dest / INDEX_NAME))

    broken = dict(good, total=good["total"] + 1)
    (dest / INDEX_NAME).write_text(json.dumps(broken))
    with pytest.raises(ShardIndexError) as excinfo:
        ShardIndex.load(open_storage(str(dest)))
    _one_line(excinfo, "malformed shard index", "total")

    del broken["shards"]
    (dest / INDEX_NAME).write_text(json.dumps(broken))
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(str(dest))
    _one_line(excinfo, "malformed shard index", "shards")

    missing = tmp_path / "nowhere"
    with pytest.raises(ShardError) as excinfo:
        prepare_shards(str(missing), str(dest))
    _one_line(excinfo, str(missing), "does not exist")
    assert not missing.exists()  # opening the source must not create it
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(str(missing))
    _one_line(excinfo, str(missing))
    assert not missing.exists()

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ShardError) as excinfo:
        prepare_shards(str(empty), str(dest))
    _one_line(excinfo, str(empty), "no image files")

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"nope")
    with pytest.raises(ShardError) as excinfo:
        prepare_shards(str(only_bad), str(tmp_path / "out2"))
    message = _one_line(excinfo, "none of 1 image files decode", "a.png", "UnidentifiedImage")
    assert "BytesIO" not in message  # Pillow's buffer name is replaced: reasons are stable
    with pytest.raises(ValueError, match="images_per_shard"):
        prepare_shards(str(folder), str(dest), images_per_shard=0)


def test_bad_bytes_in_a_shard_raise_image_decode_error(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    prepare_shards(str(folder), str(dest), **SMALL)
    # Damage one stored image (shard 1, row group 0, row 1 = global index 9), keeping row groups.
    path = dest / "part-00001.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[1] = images[1][:100]
    table = table.set_column(1, table.schema.field("image"), pa.array(images, pa.binary()))
    pq.write_table(table, path, row_group_size=3)
    bad_id = table.column("id")[1].as_py()

    dataset = ParquetImageDataset(str(dest))
    with pytest.raises(ImageDecodeError) as excinfo:
        dataset.load(9)
    message = _one_line(excinfo, bad_id, "part-00001.parquet")
    assert excinfo.value.path == Path(bad_id), message
    assert pickle.loads(pickle.dumps(excinfo.value)).reason == excinfo.value.reason
    with pytest.raises(ImageDecodeError) as from_pixels:
        dataset.load_pixels(9)  # the two-view path's decoder fails alike
    assert str(from_pixels.value) == message

    # The two-view wrapper skips it like an undecodable file of the folder path.
    two_views = TwoViewDataset(dataset, TwoViews(32))
    sample = two_views[9]
    assert sample["skipped"] == 1 and sample["view1"].shape == (3, 32, 32)

    # A shard that no longer matches the index is an error of the set, not of an image.
    pq.write_table(table, path, row_group_size=4)
    with pytest.raises(ShardError) as excinfo:
        ParquetImageDataset(str(dest)).load(9)
    _one_line(excinfo, "part-00001.parquet", "does not match", "re-run prepare_shards")


def test_data_loader_workers_give_the_same_batches_as_the_folder(
    clean_folder: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "shards"
    prepare_shards(str(clean_folder), str(dest), **SMALL)
    dataset = ParquetImageDataset(str(dest), cache_row_groups=2)
    dataset.load(0)  # the parent has open files and a cache: workers must not inherit them
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == NUM_IMAGES and not clone._cache and not clone._files
    assert clone.record(5) == dataset.record(5)

    transform = TwoViews(32)
    from_shards = list(build_loader(dataset, transform, batch_size=10, seed=3, num_workers=2))
    from_folder = list(build_loader(ImageFolderDataset(clean_folder), transform, 10, seed=3))
    assert len(from_shards) == len(from_folder) == 3
    for got, want in zip(from_shards, from_folder, strict=True):
        assert torch.equal(got["index"], want["index"])
        assert int(got["skipped"].sum()) == 0
        for key in ("view1", "view2", "crop1", "crop2"):
            assert torch.equal(got[key], want[key]), key


def test_labels_mode(clean_folder: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(clean_folder, source)
    (source / "loose.jpg").write_bytes((next(source.rglob("*.jpg"))).read_bytes())
    dest = tmp_path / "shards"
    index = prepare_shards(str(source), str(dest), labels=True, **SMALL)

    classes = sorted(p.name for p in clean_folder.iterdir() if p.is_dir())
    assert index.labels and index.classes == classes and len(classes) > 5
    assert json.loads((dest / LABELS_NAME).read_text()) == classes
    assert index.skipped == [
        {"id": "loose.jpg", "reason": "not inside a class folder (labels=True)"}
    ]
    assert pq.ParquetFile(dest / "part-00000.parquet").schema_arrow.field("label").type == (
        pa.int32()
    )
    dataset = ParquetImageDataset(str(dest))
    assert dataset.classes == classes and len(dataset) == NUM_IMAGES
    for i in range(len(dataset)):
        rec = dataset.record(i)
        assert classes[rec.label] == rec.id.split("/")[0]

    # Rebuilt without labels: the class list goes away with the label column.
    prepare_shards(str(source), str(dest), **SMALL)
    assert not (dest / LABELS_NAME).exists()
    assert ParquetImageDataset(str(dest)).record(0).label is None


def test_cli_prints_progress_and_the_summary(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "shards"
    assert main([str(folder), str(dest), "--images-per-shard", "16", "--single-process"]) == 0
    out = capsys.readouterr().out
    assert f"{NUM_IMAGES} images in 2 shards" in out and "skipped: 1" in out and CORRUPT in out
    last = [line for line in out.splitlines() if line.startswith("[shards] images")][-1]
    assert last.startswith(f"[shards] images {NUM_IMAGES + 1}/{NUM_IMAGES + 1} (100%) · ")
    assert " images/s · shards 2 · " in last, last


def test_cli_bad_input_is_one_line_and_status_2_before_ray_starts(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "out")], ["error: source", "missing"]),
        ([str(empty), str(tmp_path / "out")], ["error: source", str(empty), "no image files"]),
        ([str(folder), str(a_file / "shards")], ["error: dest", str(a_file / "shards")]),
        ([str(folder), str(tmp_path / "out"), "--images-per-shard", "0"], ["images_per_shard"]),
        ([str(folder), str(tmp_path / "out"), "--cpus-per-task", "0"], ["--cpus-per-task"]),
    ]
    for argv, fragments in cases:
        assert main(argv) == 2, argv  # without --single-process: Ray would start next
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "\n" not in err and "Traceback" not in err and not captured.out, err
        assert err.startswith("error: ") and all(f in err for f in fragments), err
    assert not ray.is_initialized()


def test_s3_source_and_s3_dest(s3_env, folder: Path, tmp_path: Path) -> None:
    endpoint = s3_env.endpoint_url
    bucket = make_bucket(endpoint)
    _upload(endpoint, bucket, folder, "raw/images")
    (folder / CORRUPT).unlink()
    shutil.rmtree(folder / CORRUPT.split("/")[0])
    folder_ds = ImageFolderDataset(folder)

    source, dest = f"s3://{bucket}/raw/images", f"s3://{bucket}/shards/v1"
    index = prepare_shards(source, dest, **SMALL)
    assert index.source == source and index.total == NUM_IMAGES
    assert [s["id"] for s in index.skipped] == [CORRUPT]
    assert _objects(endpoint, bucket, "shards/") == [f"shards/v1/{INDEX_NAME}"] + [
        f"shards/v1/part-0000{k}.parquet" for k in range(4)
    ]
    dataset = ParquetImageDataset(dest)
    assert dataset.uri == dest
    _assert_same_images(dataset, folder_ds)
    # In a forked child (simulated: another pid) the S3 client and cache are rebuilt, not shared.
    parent_fs, dataset._pid = dataset.storage.filesystem, -1
    assert dataset.record(3).id == _rel_ids(folder_ds)[3]
    assert dataset.storage.filesystem is not parent_fs and dataset._pid == os.getpid()
    assert dataset.storage.filesystem.equals(parent_fs)

    # Idempotent on S3 too: the index object is not rewritten.
    client = s3_client(endpoint)
    stamp = client.head_object(Bucket=bucket, Key=f"shards/v1/{INDEX_NAME}")["ETag"]
    before = client.head_object(Bucket=bucket, Key=f"shards/v1/{INDEX_NAME}")["LastModified"]
    assert prepare_shards(source, dest, **SMALL) == index
    after = client.head_object(Bucket=bucket, Key=f"shards/v1/{INDEX_NAME}")
    assert after["ETag"] == stamp and after["LastModified"] == before

    # Local source → S3 dest gives the same rows; an S3 set also loads through forked workers.
    local_to_s3 = prepare_shards(str(folder), f"s3://{bucket}/from-local", **SMALL)
    assert local_to_s3.total == NUM_IMAGES and not local_to_s3.skipped
    loader = build_loader(ParquetImageDataset(dest), TwoViews(32), 10, seed=1, num_workers=2)
    reference = build_loader(folder_ds, TwoViews(32), 10, seed=1)
    for got, want in zip(loader, reference, strict=True):
        assert torch.equal(got["view1"], want["view1"]) and torch.equal(got["crop2"], want["crop2"])

    client.delete_object(Bucket=bucket, Key=f"shards/v1/{INDEX_NAME}")
    with pytest.raises(ShardIndexError) as excinfo:
        ParquetImageDataset(dest)
    _one_line(excinfo, f"{dest}/{INDEX_NAME}")
    with pytest.raises(ShardError) as excinfo:
        prepare_shards(f"s3://{bucket}/no/such/prefix", f"s3://{bucket}/out")
    _one_line(excinfo, f"s3://{bucket}/no/such/prefix", "no image files")


# --------------------------------------------------------------------------------------------
# Parallel preparation in Ray tasks (slow: they start Ray)

KILLED_DRIVER = """
import os, signal, sys
import ray
from dupr_platform import progress, shards

real_update = progress.Progress.update

def update(self, done, metrics=None):
    real_update(self, done, metrics)
    if metrics and metrics["shards"] >= 3:  # the driver dies mid-run, as with a lost head node
        os.kill(os.getpid(), signal.SIGKILL)

progress.Progress.update = update
ray.init(address="local", num_cpus=2, include_dashboard=False)
sys.exit(shards.main(sys.argv[1:]))
"""


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid``: a driver started with a new session and its Ray."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_pids(sid)


def test_ray_tasks_write_what_one_process_writes(
    local_ray, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    single = prepare_shards(str(folder), str(tmp_path / "single"), **SMALL)
    capsys.readouterr()
    parallel = prepare_shards(
        str(folder), str(tmp_path / "ray"), **SMALL, parallel=True, progress=True
    )
    assert parallel == single  # ids and their order, row groups, skips: the same index
    for shard in single.shards:  # and byte for byte the same files
        got = (tmp_path / "ray" / shard.path).read_bytes()
        assert got == (tmp_path / "single" / shard.path).read_bytes(), shard.path
    out = capsys.readouterr().out
    assert f"[shards] images {NUM_IMAGES + 1}/{NUM_IMAGES + 1} (100%)" in out and "images/s" in out


def test_ray_tasks_write_to_s3(local_ray, s3_env, clean_folder: Path, tmp_path: Path) -> None:
    bucket = make_bucket(s3_env.endpoint_url)
    dest = f"s3://{bucket}/shards"
    index = prepare_shards(str(clean_folder), dest, **SMALL, parallel=True)
    assert index == prepare_shards(str(clean_folder), str(tmp_path / "single"), **SMALL)
    assert _objects(s3_env.endpoint_url, bucket, "shards/") == [f"shards/{INDEX_NAME}"] + [
        f"shards/part-0000{k}.parquet" for k in range(4)
    ]
    _assert_same_images(ParquetImageDataset(dest), ImageFolderDataset(clean_folder))


def test_cli_resumes_after_the_driver_is_killed(
    local_ray, clean_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "shards"
    argv = [str(clean_folder), str(dest), "--images-per-shard", "4", "--row-group-size", "3"]
    output = tmp_path / "driver.out"
    with open(output, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", KILLED_DRIVER, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its Ray processes too: all of them are stopped below
        )
    try:
        assert driver.wait(timeout=120) == -signal.SIGKILL, output.read_text()
    finally:
        _kill_session(driver.pid)
    assert "[shards] images 0/30 (0%)" in output.read_text()
    assert not (dest / INDEX_NAME).exists()
    finished = sorted(p.name.removesuffix(".json") for p in (dest / MANIFEST_DIR).iterdir())
    assert 3 <= len(finished) < 8, finished  # 8 shards of 4 images
    kept = {name: _stamp(dest / name) for name in finished}

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"[shards] {len(finished)} of 8 shards already complete: kept" in out
    assert "[shards] images 30/30 (100%)" in out and "30 images in 8 shards" in out
    assert {name: _stamp(dest / name) for name in kept} == kept  # not rewritten
    ref = tmp_path / "reference"
    reference = prepare_shards(str(clean_folder), str(ref), images_per_shard=4, row_group_size=3)
    assert ShardIndex.load(open_storage(str(dest))) == reference
    for shard in reference.shards:
        assert (dest / shard.path).read_bytes() == (ref / shard.path).read_bytes(), shard.path
