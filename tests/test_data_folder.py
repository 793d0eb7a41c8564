"""Tests for dupr.data.folder: listing order, filtering, strict RGB decoding and typed errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFile

from dupr.data import bundled_photos
from dupr.data import folder as folder_module
from dupr.data.folder import IMAGE_EXTENSIONS, ImageDecodeError, ImageFolderDataset


def _photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB gradient with a little texture, so JPEG encoding behaves like on photos."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _rgb(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(_photo_like(width, height, seed))


def test_extensions_are_lowercase_with_dot() -> None:
    expected = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    assert set(IMAGE_EXTENSIONS) == expected


def test_nested_folders_are_listed_recursively_in_sorted_order(tmp_path: Path) -> None:
    _save(tmp_path / "b" / "2.jpg", _rgb())
    _save(tmp_path / "a" / "z.png", _rgb())
    _save(tmp_path / "a" / "sub" / "1.jpg", _rgb())
    _save(tmp_path / "a" / "sub" / "deeper" / "0.bmp", _rgb())
    _save(tmp_path / "0.JPG", _rgb(), format="JPEG")  # upper-case suffix still counts
    _save(tmp_path / "c.Tiff", _rgb(), format="TIFF")

    dataset = ImageFolderDataset(tmp_path)

    relative = [p.relative_to(tmp_path).as_posix() for p in dataset.paths]
    assert relative == [
        "0.JPG",
        "a/sub/1.jpg",
        "a/sub/deeper/0.bmp",
        "a/z.png",
        "b/2.jpg",
        "c.Tiff",
    ]
    assert len(dataset) == 6
    assert all(isinstance(p, Path) for p in dataset.paths)
    # The order does not depend on how the folder was created or listed.
    assert ImageFolderDataset(str(tmp_path)).paths == dataset.paths


def test_non_image_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    keep = _save(tmp_path / "photos" / "keep.png", _rgb())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "labels.json").write_text("{}")
    (tmp_path / "photos" / "keep.png.bak").write_bytes(keep.read_bytes())
    _save(tmp_path / ".hidden.jpg", _rgb(), format="JPEG")
    _save(tmp_path / "photos" / ".thumb.png", _rgb())
    _save(tmp_path / ".git" / "blob.png", _rgb())
    _save(tmp_path / "photos" / ".cache" / "x.jpg", _rgb(), format="JPEG")
    (tmp_path / "folder.jpg").mkdir()  # a directory with an image suffix is not a file

    dataset = ImageFolderDataset(tmp_path)

    assert dataset.paths == [keep]


def test_loads_every_mode_as_rgb_with_the_right_size(tmp_path: Path) -> None:
    gray = _save(tmp_path / "gray.png", Image.fromarray(_photo_like(33, 21)[..., 0]))
    rgba_array = np.dstack([_photo_like(34, 22), np.full((22, 34), 128, np.uint8)])
    rgba = _save(tmp_path / "rgba.png", Image.fromarray(rgba_array))
    palette = _save(tmp_path / "palette.png", _rgb(35, 23).quantize(colors=16))
    sixteen = np.linspace(0, 65535, 36 * 24).reshape(24, 36).astype(np.uint16)
    sixteen_bit = _save(tmp_path / "sixteen.png", Image.fromarray(sixteen))
    cmyk = _save(tmp_path / "cmyk.jpg", _rgb(37, 25).convert("CMYK"), format="JPEG")
    bilevel = _save(tmp_path / "bilevel.bmp", _rgb(38, 26).convert("1"))
    gray_pgm = _save(tmp_path / "gray.pgm", Image.fromarray(_photo_like(39, 27)[..., 1]))
    with Image.open(sixteen_bit) as check:
        assert check.mode.startswith("I")  # really stored as 16-bit

    dataset = ImageFolderDataset(tmp_path)
    expected_sizes = {
        gray: (33, 21),
        rgba: (34, 22),
        palette: (35, 23),
        sixteen_bit: (36, 24),
        cmyk: (37, 25),
        bilevel: (38, 26),
        gray_pgm: (39, 27),
    }
    assert sorted(dataset.paths) == sorted(expected_sizes)
    for index, path in enumerate(dataset.paths):
        image = dataset[index]
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB", path.name
        assert image.size == expected_sizes[path], path.name

    # 16-bit samples are scaled to 8 bits, not clipped at 255 (which would make it all white).
    loaded = np.asarray(dataset.load(dataset.paths.index(sixteen_bit)))
    assert loaded[0, 0].tolist() == [0, 0, 0]
    assert loaded[-1, -1].tolist() == [255, 255, 255]
    assert 100 < loaded[12, 18, 0] < 156
    # Gray stays gray: the three channels are equal.
    gray_rgb = np.asarray(dataset.load(dataset.paths.index(gray)))
    assert np.array_equal(gray_rgb[..., 0], gray_rgb[..., 2])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = _rgb(60, 20)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _save(tmp_path / "phone.jpg", image, format="JPEG", exif=exif)

    loaded = ImageFolderDataset(tmp_path)[0]

    assert loaded.size == (20, 60)
    assert loaded.mode == "RGB"


def test_getitem_returns_the_same_image_as_load(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _rgb(seed=1))
    _save(tmp_path / "b.png", _rgb(seed=2))
    dataset = ImageFolderDataset(tmp_path)

    for index in range(len(dataset)):
        assert np.array_equal(np.asarray(dataset[index]), np.asarray(dataset.load(index)))
    assert not np.array_equal(np.asarray(dataset[0]), np.asarray(dataset[1]))
    # DataLoader workers receive the dataset by pickling.
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.paths == dataset.paths


def test_pixels_are_the_pil_images_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_pixels` (TorchCodec for gray and RGB JPEGs, PIL for the rest) gives exactly the
    pixels of `load`'s PIL image: every mode, JPEG's chroma subsamplings, progressive, EXIF's
    eight orientations, and real photographs."""
    photos = [p.convert("RGB") for _, p in bundled_photos()][:4]
    jpegs = {}
    for i, photo in enumerate(photos):
        for subsampling in (0, 1, 2):
            name = f"photo{i}-{subsampling}.jpg"
            jpegs[name] = _save(tmp_path / name, photo, quality=90, subsampling=subsampling)
    jpegs["progressive.jpg"] = _save(tmp_path / "progressive.jpg", photos[0], progressive=True)
    jpegs["gray.jpg"] = _save(tmp_path / "gray.jpg", photos[1].convert("L"), quality=90)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        name = f"exif{orientation}.jpg"
        jpegs[name] = _save(tmp_path / name, _rgb(60, 20), format="JPEG", exif=exif.tobytes())
    _save(tmp_path / "cmyk.jpg", _rgb(37, 25).convert("CMYK"), format="JPEG")
    _save(tmp_path / "rgba.png", Image.fromarray(np.dstack([_photo_like(34, 22)] * 2)[..., :4]))
    sixteen = np.linspace(0, 65535, 36 * 24).reshape(24, 36).astype(np.uint16)
    _save(tmp_path / "sixteen.png", Image.fromarray(sixteen))
    _save(tmp_path / "bilevel.bmp", _rgb(38, 26).convert("1"))

    assert folder_module.decode_jpeg is not None  # TorchCodec is installed with the project
    decoded = []
    real_decode_jpeg = folder_module.decode_jpeg

    def counting(data: bytes, mode: str) -> torch.Tensor:
        pixels = real_decode_jpeg(data, mode=mode)
        decoded.append(pixels.shape[0])
        return pixels

    monkeypatch.setattr(folder_module, "decode_jpeg", counting)
    dataset = ImageFolderDataset(tmp_path)
    for index, path in enumerate(dataset.paths):
        pixels = dataset.load_pixels(index)
        expected = F.pil_to_tensor(dataset.load(index))
        assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape, path.name
        assert torch.equal(pixels, expected), path.name
    # The RGB and gray JPEGs took TorchCodec's path; the CMYK one was left to PIL.
    assert sorted(decoded) == [1] + [3] * (len(jpegs) - 1) + [4]


def _bad_files(root: Path) -> dict[str, Path]:
    good = _save(root / "good.jpg", _rgb(256, 192), format="JPEG", quality=90)
    data = good.read_bytes()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "text.png"
    text.write_text("this is a text file, not a PNG\n")
    return {"truncated": truncated, "empty": empty, "text": text}


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_undecodable_files_raise_a_typed_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    bad = _bad_files(tmp_path)[kind]
    dataset = ImageFolderDataset(tmp_path)
    assert bad in dataset.paths
    index = dataset.paths.index(bad)

    with pytest.raises(ImageDecodeError) as info:
        dataset.load(index)
    with pytest.raises(ImageDecodeError):
        dataset[index]
    with pytest.raises(ImageDecodeError) as from_pixels:
        dataset.load_pixels(index)
    assert str(from_pixels.value) == str(info.value)  # the same error on the tensor path

    error = info.value
    assert error.path == bad
    message = str(error)
    assert str(bad) in message
    assert "\n" not in message
    assert len(message) > len(str(bad)) + 10  # the reason is included, not just the path
    # The good file next to it still loads, and the global Pillow setting was not changed.
    assert dataset.load(dataset.paths.index(tmp_path / "good.jpg")).size == (256, 192)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_error_is_an_exception_with_path() -> None:
    error = ImageDecodeError("some/dir/x.jpg", "broken\ndata")
    assert isinstance(error, Exception)
    assert error.path == Path("some/dir/x.jpg")
    assert str(error) == f"cannot decode image {Path('some/dir/x.jpg')}: broken data"
    clone = pickle.loads(pickle.dumps(error))  # errors cross process boundaries in workers
    assert isinstance(clone, ImageDecodeError)
    assert (clone.path, str(clone)) == (error.path, str(error))


def test_missing_root_raises_file_not_found_naming_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataset(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_root_without_images_raises_file_not_found_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    _save(tmp_path / ".hidden" / "x.png", _rgb())  # hidden images do not count

    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolderDataset(empty)
