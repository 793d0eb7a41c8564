"""An unlabeled image folder: every decodable image file under a root, in a fixed order.

Self-supervised pre-training needs no labels, so the dataset is simply the sorted list of image
files under a folder (recursively). The order is deterministic so that a seed reproduces the same
samples on every machine. Decoding is strict: a file that cannot be fully decoded raises one typed
`ImageDecodeError` naming the file, fast, instead of silently yielding a partial or gray image;
deciding whether to skip such files is left to a wrapper.

Two ways out of the one decoder: a PIL image (`load_rgb`, `decode_rgb`: evaluation, figures) and
the (3, H, W) uint8 tensor the pre-training views are cut from (`load_pixels`, `decode_pixels`),
which takes JPEGs straight to a tensor.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch.utils.data
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torch import Tensor

try:  # a declared dependency; a machine with its own PyTorch may lack a build for it
    from torchcodec.decoders import decode_jpeg
except (ImportError, OSError, RuntimeError):  # then PIL decodes every image (same pixels)
    decode_jpeg = None  # type: ignore[assignment]

# Lower-case suffixes (with the dot) of the files the folder reads; matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)


_BUFFER_RE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class ImageDecodeError(Exception):
    """An image file that could not be decoded; `.path` names it, the message is one line."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"cannot decode image {self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[Path, str]]:
        # Rebuilt from (path, reason), so the error survives pickling (DataLoader workers, Ray).
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def list_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Image files under `root`, recursively, skipping hidden files and folders, sorted.

    The sort key is the tuple of path components relative to `root`, so the order does not depend
    on the file system's listing order or on the platform's path separator. Symbolic links to
    folders are not followed (no cycles); links to files are listed like files.
    """
    root_path = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=False):
        # Pruning in place stops os.walk from descending into hidden folders.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not is_image_file(name):
                continue
            path = Path(dirpath, name)
            if path.is_file():
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root_path).parts)
    return found


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, scaling 16-bit samples instead of clipping them.

    `convert("RGB")` clips 16-bit gray ("I;16", "I") values at 255, which would turn most 16-bit
    images white, so those are scaled to 8 bits first. Alpha is dropped, as torchvision does.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = np.clip(values, 0, 65535) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    elif mode == "F":
        floats = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if floats.max(initial=0.0) <= 1.0:
            floats = floats * 255.0
        image = Image.fromarray(np.clip(np.rint(floats), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _decode(file: str | os.PathLike[str] | BinaryIO, source: str | os.PathLike[str]) -> Image.Image:
    """The one decoder behind `load_rgb` and `decode_rgb`; errors name `source`.

    `load()` forces the full decode while the file is open, so a truncated file raises here
    (Pillow's global `LOAD_TRUNCATED_IMAGES` is left alone and must be False for that). The EXIF
    orientation is applied so that phone photos are not sideways.
    """
    try:
        with Image.open(file) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except Exception as exc:  # Pillow raises many types for malformed data; all mean "bad file".
        # Pillow names a buffer by its repr ("<_io.BytesIO object at 0x...>"): name the source
        # instead, as Pillow names a file (quoted), so that messages (and the reasons a shard
        # index keeps) are the same every run, and a file's read the same from path or bytes.
        name = os.fspath(source)
        reason = _BUFFER_RE.sub(lambda _: repr(name), f"{type(exc).__name__}: {exc}")
        raise ImageDecodeError(source, reason) from exc


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode the whole file at `path` into an upright RGB image, or raise `ImageDecodeError`."""
    return _decode(path, path)


def decode_rgb(data: bytes, source: str) -> Image.Image:
    """Encoded image bytes (e.g. from a Parquet shard) → upright RGB, exactly as `load_rgb`.

    Raises `ImageDecodeError` whose `.path` is `source` (a file name or an image id).
    """
    return _decode(io.BytesIO(data), source)


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_pixels(data: bytes, source: str | os.PathLike[str]) -> Tensor:
    """Encoded image bytes → (3, H, W) uint8 RGB pixels, upright: `decode_rgb`'s image as a
    tensor (a view of (H, W, 3) memory, as `pil_to_tensor` gives it).

    A JPEG in gray or RGB (nearly every training image) goes to TorchCodec's `decode_jpeg`:
    libjpeg-turbo, as in PIL, with the EXIF orientation applied, giving the same pixels
    (`tests/test_data_folder.py`) without PIL's three copies of the image on the way to a
    tensor (EXIF transpose, RGB conversion, array export): a sample with both views cut took
    1.86 instead of 2.27 ms (`benchmarks/decode_throughput.py`). Every other image, a CMYK JPEG
    (whose conversion to RGB differs between the two), and a JPEG it refuses go through PIL,
    which raises `ImageDecodeError` for one that is really broken, so errors read the same.
    """
    pixels = _jpeg_pixels(data)
    return pixels if pixels is not None else F.pil_to_tensor(decode_rgb(data, os.fspath(source)))


def load_pixels(path: str | os.PathLike[str]) -> Tensor:
    """`decode_pixels` of the file at `path`; raises `ImageDecodeError` as `load_rgb` does."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return F.pil_to_tensor(load_rgb(path))  # which raises the error PIL gives for the path
    return decode_pixels(data, path)


def _jpeg_pixels(data: bytes) -> Tensor | None:
    """TorchCodec's pixels of a gray or RGB JPEG; None where PIL must decide."""
    if decode_jpeg is None or data[:3] != JPEG_MAGIC:
        return None
    try:
        pixels = decode_jpeg(data, mode="UNCHANGED")  # one image in, one tensor out
    except Exception:  # whatever it raises (RuntimeError for a broken file), PIL decides
        return None
    assert isinstance(pixels, Tensor)
    if pixels.shape[0] == 1:
        return pixels.expand(3, -1, -1)
    return pixels if pixels.shape[0] == 3 else None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabeled images under `root` (recursively, sorted); item `i` is an RGB `PIL.Image`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a directory")
        self.paths: list[Path] = list_image_files(self.root)
        if not self.paths:
            raise FileNotFoundError(
                f"image folder {self.root} contains no image files "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)}, hidden files ignored)"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The `index`-th image in RGB; raises `ImageDecodeError` if the file does not decode."""
        return load_rgb(self.paths[index])

    def load_pixels(self, index: int) -> Tensor:
        """The `index`-th image as (3, H, W) uint8 pixels (`decode_pixels`): what the
        pre-training views are cut from."""
        return load_pixels(self.paths[index])

    def __getitem__(self, index: int) -> Image.Image:
        return self.load(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, num_images={len(self.paths)})"
