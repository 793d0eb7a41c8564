"""Tests for dupr.data.bundled: real photographs, deterministic and idempotent offline builds."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dupr.data import bundled
from dupr.data.bundled import (
    MANIFEST_NAME,
    build_bundled_image_folder,
    bundled_image_folder,
    bundled_photos,
    default_data_home,
)
from dupr.data.folder import ImageFolderDataset

NUM = 24  # small, so that each build takes a fraction of a second


@pytest.fixture(autouse=True)
def _private_data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real ~/.cache/dupr from tests."""
    home = tmp_path / "data-home"
    monkeypatch.setenv("DUPR_DATA_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, Image.Image]]:
    return bundled_photos()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build shared by the read-only tests; tests that modify a build copy it first."""
    return build_bundled_image_folder(tmp_path_factory.mktemp("built") / "set", num_images=NUM)


def neighbour_correlation(image: Image.Image) -> float:
    """Correlation of each gray pixel with its right and lower neighbours.

    Photographs are smooth almost everywhere (about 0.9 and above); independent noise gives ~0.
    """
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    left = np.concatenate([gray[:, :-1].ravel(), gray[:-1, :].ravel()])
    right = np.concatenate([gray[:, 1:].ravel(), gray[1:, :].ravel()])
    return float(np.corrcoef(left, right)[0, 1])


def jpeg_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in jpeg_files(root)
    }


def test_noise_check_rejects_noise() -> None:
    # The check used below must be able to tell noise from photographs at all.
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8))
    assert abs(neighbour_correlation(noise)) < 0.1


def test_at_least_ten_distinct_real_photos(photos: list[tuple[str, Image.Image]]) -> None:
    assert len(photos) >= 10
    names = [name for name, _ in photos]
    assert len(set(names)) == len(names)
    thumbnails = []
    for name, image in photos:
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB", name
        assert min(image.size) >= 256, name  # full photographs, not icons
        assert neighbour_correlation(image) > 0.9, name
        thumbnails.append(np.asarray(image.convert("L").resize((32, 32)), dtype=np.float64))
    for i in range(len(thumbnails)):
        for j in range(i + 1, len(thumbnails)):
            difference = np.abs(thumbnails[i] - thumbnails[j]).mean()
            assert difference > 5, f"{names[i]} and {names[j]} look the same"


def test_photos_come_in_a_fixed_order(photos: list[tuple[str, Image.Image]]) -> None:
    again = bundled_photos()
    assert [name for name, _ in again] == [name for name, _ in photos]
    assert np.array_equal(np.asarray(again[0][1]), np.asarray(photos[0][1]))


def test_build_writes_num_images_decodable_jpegs_within_bounds(
    built: Path, photos: list[tuple[str, Image.Image]]
) -> None:
    files = jpeg_files(built)
    assert len(files) == NUM
    assert {p.parent.parent for p in files} == {built}  # one subfolder per photo
    contributing = {p.parent.name for p in files}
    assert contributing == {name for name, _ in photos}  # crops cycle over every photo
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            image.load()
            assert image.mode == "RGB"
            assert 128 <= max(image.size) <= 256, path
            assert min(image.size) >= 1
            correlation = neighbour_correlation(image)
        assert correlation > 0.8, f"{path} looks like noise ({correlation:.2f})"


def test_crops_vary_in_position_and_scale(built: Path) -> None:
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    boxes = [tuple(entry["crop_box"]) for entry in manifest["files"]]
    assert len(set(boxes)) == NUM
    areas = {}
    for entry in manifest["files"]:
        source = next(s for s in manifest["sources"] if entry["path"].startswith(s["name"] + "/"))
        x0, y0, x1, y1 = entry["crop_box"]
        areas[entry["path"]] = (x1 - x0) * (y1 - y0) / (source["width"] * source["height"])
    assert min(areas.values()) >= 0.09
    assert max(areas.values()) <= 1.0
    assert max(areas.values()) - min(areas.values()) > 0.3  # both details and whole scenes
    sizes = {max(entry["width"], entry["height"]) for entry in manifest["files"]}
    assert len(sizes) > NUM // 2


def test_manifest_describes_the_build(built: Path, photos: list[tuple[str, Image.Image]]) -> None:
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    assert manifest["version"] == 1
    assert manifest["num_images"] == NUM
    assert manifest["seed"] == 0
    assert (manifest["min_side"], manifest["max_side"]) == (128, 256)
    assert [s["name"] for s in manifest["sources"]] == [name for name, _ in photos]
    assert all(s["source"] for s in manifest["sources"])
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    assert listed == file_hashes(built)
    # No temporary folders or files are left next to or inside the build.
    assert [p.name for p in built.parent.iterdir()] == [built.name]
    assert not [p for p in built.rglob(".*")]


def test_image_folder_dataset_reads_the_build(built: Path) -> None:
    dataset = ImageFolderDataset(built)
    assert len(dataset) == NUM
    assert all(p.suffix == ".jpg" for p in dataset.paths)
    for index in range(len(dataset)):
        image = dataset[index]
        assert image.mode == "RGB"
        assert 128 <= max(image.size) <= 256


def test_same_seed_gives_identical_bytes_and_other_seed_differs(
    built: Path, tmp_path: Path
) -> None:
    again = build_bundled_image_folder(tmp_path / "again", num_images=NUM, seed=0)
    other = build_bundled_image_folder(tmp_path / "other", num_images=NUM, seed=1)

    assert file_hashes(again) == file_hashes(built)
    assert (again / MANIFEST_NAME).read_bytes() == (built / MANIFEST_NAME).read_bytes()
    other_hashes = file_hashes(other)
    assert len(other_hashes) == NUM
    assert set(other_hashes.values()).isdisjoint(file_hashes(built).values())


def test_second_call_is_a_cheap_no_op(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(built, root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def no_photos() -> None:
        raise AssertionError("a complete build must not load the photos again")

    monkeypatch.setattr(bundled, "_bundled_photos_with_sources", no_photos)
    assert build_bundled_image_folder(root, num_images=NUM) == root.absolute()

    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_folder_without_manifest_is_rebuilt(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "partial"
    shutil.copytree(built, root)
    (root / MANIFEST_NAME).unlink()
    victims = jpeg_files(root)[:3]
    for path in victims:
        path.unlink()  # as if the writer had been killed half-way

    build_bundled_image_folder(root, num_images=NUM)

    assert (root / MANIFEST_NAME).is_file()
    assert file_hashes(root) == file_hashes(built)


def test_damaged_file_or_other_arguments_trigger_a_rebuild(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "damaged"
    shutil.copytree(built, root)
    first = jpeg_files(root)[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated after the manifest was written

    build_bundled_image_folder(root, num_images=NUM)
    assert file_hashes(root) == file_hashes(built)

    build_bundled_image_folder(root, num_images=NUM, seed=3)  # same folder, other content
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["seed"] == 3
    assert len(jpeg_files(root)) == NUM
    assert set(file_hashes(root).values()).isdisjoint(file_hashes(built).values())


def test_size_bounds_are_respected(tmp_path: Path) -> None:
    root = build_bundled_image_folder(tmp_path / "small", num_images=16, min_side=64, max_side=80)
    files = jpeg_files(root)
    assert len(files) == 16
    for path in files:
        with Image.open(path) as image:
            assert 64 <= max(image.size) <= 80


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    precious = root / "thesis.txt"
    precious.write_text("do not delete")

    with pytest.raises(FileExistsError, match="refusing"):
        build_bundled_image_folder(root, num_images=NUM)

    assert precious.read_text() == "do not delete"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # the temporary build was removed


def test_concurrent_builds_agree(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_bundled_image_folder(root, num_images=NUM))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [root.absolute()] * 3
    assert file_hashes(root) == file_hashes(built)
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_default_data_home_and_bundled_image_folder(
    built: Path, _private_data_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_data_home() == _private_data_home
    folder = bundled_image_folder(num_images=NUM)
    assert folder == _private_data_home / f"bundled-unlabeled-v1-{NUM}"
    assert file_hashes(folder) == file_hashes(built)

    monkeypatch.delenv("DUPR_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_home() == tmp_path / "home" / ".cache" / "dupr"


def test_missing_sources_are_skipped_but_too_few_photos_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken() -> list:
        raise ModuleNotFoundError("No module named 'not_installed'")

    sources = dict(bundled._SOURCES)
    monkeypatch.setattr(bundled, "_SOURCES", (("broken", broken), *bundled._SOURCES))
    assert len(bundled_photos()) >= 10

    monkeypatch.setattr(
        bundled, "_SOURCES", (("broken", broken), ("matplotlib", sources["matplotlib"]))
    )
    with pytest.raises(RuntimeError, match="at least 10 photographs") as info:
        build_bundled_image_folder(tmp_path / "too-few", num_images=NUM)
    assert "broken" in str(info.value)
    assert not (tmp_path / "too-few").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_images": 0},
        {"min_side": 0},
        {"min_side": 300, "max_side": 200},
        {"seed": -1},
    ],
)
def test_invalid_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_bundled_image_folder(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
