"""The bundled default data: a small unlabeled image folder built offline from real photographs.

Why it exists: the project must train and be tested on machines without internet access, and
self-supervised pre-training on random noise teaches nothing (and hides bugs, since any loss curve
looks plausible on noise). So the default data set is made from real photographs that installed
packages already ship: scikit-image's bundled sample images (read straight from
`skimage.data.data_dir`, never through its downloader), scikit-learn's two sample images and
matplotlib's portrait of Grace Hopper. Each source is optional; at least `MIN_PHOTOS` photographs
must be found.

From those photos, `build_bundled_image_folder` writes a few hundred JPEG files made by seeded
random crops of varied position, scale and aspect ratio, resized to a small size, so that the set
is diverse yet small and fast to decode. The result is deterministic: the same arguments (and the
same package versions) give byte-identical files. The folder is written to a temporary sibling
and renamed into place with its `MANIFEST.json` last, so readers never see a half-written set;
a second call with the same arguments finds the manifest and returns at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dupr.data.folder import load_rgb
from dupr.io import is_partial_write, write_atomically

logger = logging.getLogger(__name__)

BUNDLED_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
MIN_PHOTOS = 10
JPEG_QUALITY = 90
# Crop scale (fraction of the photo's area) and aspect ratio (width / height), as in the
# random-resized-crop of contrastive learning, so crops range from details to the whole scene.
CROP_AREA = (0.10, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)

# Real photographs (or micrographs) of objects and scenes that scikit-image ships inside its wheel.
# Left out on purpose: synthetic or tiny images (checkerboard, logo, text, page, colorwheel,
# phantom, binary blobs, the horse silhouette, the 25x25 faces, the 102x102 microaneurysms crop);
# images that scikit-image only provides by download (brain, eagle, lily, skin, kidney, ...); and
# the object-free textures (grass, gravel, brick) and the Hubble deep field, whose crops at 128 to
# 256 pixels are nearly as uncorrelated between neighbouring pixels as noise (0.5 to 0.65) and
# hold no objects for a detector to learn from. "cat" is the same photograph as "chelsea", and the
# right stereo motorcycle view is a near copy of the left one, so each appears once.
SKIMAGE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut.png"),
    ("camera", "camera.png"),
    ("cell", "cell.png"),
    ("chelsea", "chelsea.png"),
    ("clock", "clock_motion.png"),
    ("coffee", "coffee.png"),
    ("coins", "coins.png"),
    ("immunohistochemistry", "ihc.png"),
    ("moon", "moon.png"),
    ("motorcycle", "motorcycle_left.png"),
    ("retina", "retina.jpg"),
    ("rocket", "rocket.jpg"),
)


def _skimage_photos() -> list[tuple[str, Image.Image, str]]:
    """scikit-image's bundled photos, read from its install folder so nothing is downloaded.

    Going through `skimage.data.<name>()` would also work offline for these files, but it may copy
    them into a cache folder and, under pytest, turns a missing file into a silent skip.
    """
    import skimage
    import skimage.data

    data_dir = Path(skimage.data.data_dir)
    # skimage's __init__.pyi stub omits the __version__ that the package defines.
    version: str = skimage.__version__  # type: ignore[attr-defined]
    photos = []
    for name, filename in SKIMAGE_PHOTOS:
        path = data_dir / filename
        if not path.is_file():
            logger.warning("bundled data: scikit-image photo %s not found at %s", name, path)
            continue
        try:
            image = load_rgb(path)
        except Exception as exc:  # one unreadable optional photo must not stop the others
            logger.warning("bundled data: skipping scikit-image photo %s: %s", name, exc)
            continue
        photos.append((name, image, f"scikit-image {version}: data/{filename}"))
    return photos


def _sklearn_photos() -> list[tuple[str, Image.Image, str]]:
    """scikit-learn's sample images (a temple in China and a flower), shipped with the package."""
    import sklearn
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = []
    for filename, array in zip(bunch.filenames, bunch.images, strict=True):
        name = Path(filename).stem
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).convert("RGB")
        photos.append((name, image, f"scikit-learn {sklearn.__version__}: {Path(filename).name}"))
    return photos


def _matplotlib_photos() -> list[tuple[str, Image.Image, str]]:
    """matplotlib's sample portrait of Grace Hopper, from its bundled sample data."""
    import matplotlib
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = load_rgb(path)
    return [("grace_hopper", image, f"matplotlib {matplotlib.__version__}: grace_hopper.jpg")]


_SOURCES: tuple[tuple[str, Callable[[], list[tuple[str, Image.Image, str]]]], ...] = (
    ("scikit-image", _skimage_photos),
    ("scikit-learn", _sklearn_photos),
    ("matplotlib", _matplotlib_photos),
)


def _bundled_photos_with_sources() -> list[tuple[str, Image.Image, str]]:
    """(name, RGB image, provenance) for every available photo, in a fixed order."""
    photos: list[tuple[str, Image.Image, str]] = []
    failures: list[str] = []
    for source, loader in _SOURCES:
        try:
            photos.extend(loader())
        except Exception as exc:  # an optional package that is missing or broken is skipped
            logger.warning("bundled data: skipping source %s: %s", source, exc)
            failures.append(f"{source} ({type(exc).__name__}: {exc})")
    names = [name for name, _, _ in photos]
    if len(set(names)) != len(names):
        raise RuntimeError(f"bundled data: duplicate photo names {sorted(names)}")
    if len(photos) < MIN_PHOTOS:
        found = ", ".join(names) or "none"
        failed = "; ".join(failures) or "none"
        raise RuntimeError(
            f"bundled data needs at least {MIN_PHOTOS} photographs but found {len(photos)} "
            f"({found}); failed sources: {failed}; install scikit-image, scikit-learn and "
            "matplotlib"
        )
    return photos


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """The real photographs shipped by installed packages, as (name, RGB image), fixed order.

    Raises `RuntimeError` if fewer than `MIN_PHOTOS` are available, since a set built from a
    handful of photos would be too repetitive to pre-train on.
    """
    return [(name, image) for name, image, _ in _bundled_photos_with_sources()]


def default_data_home() -> Path:
    """Where built data sets are cached: `$DUPR_DATA_HOME` if set, else `~/.cache/dupr`."""
    value = os.environ.get("DUPR_DATA_HOME")
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "dupr"


def bundled_image_folder(num_images: int = 512) -> Path:
    """The bundled unlabeled image folder with `num_images` images, built on first use."""
    root = default_data_home() / f"bundled-unlabeled-v{BUNDLED_VERSION}-{num_images}"
    return build_bundled_image_folder(root, num_images=num_images)


def _spec(num_images: int, min_side: int, max_side: int, seed: int) -> dict[str, Any]:
    """Everything that determines the folder's content; a manifest with the same spec is reused."""
    return {
        "format": "dupr-bundled-unlabeled",
        "version": BUNDLED_VERSION,
        "num_images": num_images,
        "seed": seed,
        "min_side": min_side,
        "max_side": max_side,
        "jpeg_quality": JPEG_QUALITY,
        "crop_area": list(CROP_AREA),
        "crop_aspect": list(CROP_ASPECT),
    }


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        with open(root / MANIFEST_NAME, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_matches(root: Path, spec: dict[str, Any], num_files: int | None = None) -> bool:
    """Whether `root` holds a finished build of `spec`: same manifest, every file present, same size.

    Only sizes are checked (a `stat` per file), not hashes, so that the check stays cheap.
    `num_files`, when given, is the number of files the manifest must list.
    """
    manifest = _read_manifest(root)
    if manifest is None or any(manifest.get(key) != value for key, value in spec.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return False
    if num_files is not None and len(files) != num_files:
        return False
    for entry in files:
        try:
            if (root / entry["path"]).stat().st_size != entry["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def _is_complete(root: Path, spec: dict[str, Any]) -> bool:
    return manifest_matches(root, spec, spec["num_images"])


def _crop_box(
    rng: np.random.Generator, width: int, height: int, min_side: int, max_side: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """A random crop box of the photo and the output size whose longer side is in the bounds.

    Only `rng.random()` is used (then mapped to integers here), because NumPy keeps the stream of
    uniform floats stable across versions, which keeps the files identical across versions.
    """
    u_area, u_aspect, u_x, u_y, u_side = rng.random(5)
    area = (CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u_area) * width * height
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
    crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
    crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
    x0 = min(width - crop_w, math.floor(u_x * (width - crop_w + 1)))
    y0 = min(height - crop_h, math.floor(u_y * (height - crop_h + 1)))
    longer = min(max_side, min_side + math.floor(u_side * (max_side - min_side + 1)))
    scale = longer / max(crop_w, crop_h)
    out_w = min(longer, max(1, round(crop_w * scale)))
    out_h = min(longer, max(1, round(crop_h * scale)))
    return (x0, y0, x0 + crop_w, y0 + crop_h), (out_w, out_h)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that it is never partial (`write_atomically`, with fsync)."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _is_our_leftover(root: Path) -> bool:
    """Whether `root` only holds what a build writes (photo folders of JPEGs and the manifest).

    A stale or partial build is deleted before rebuilding; this check keeps that from ever
    deleting a folder of someone else's files that was passed as `root` by mistake.
    """
    if not root.is_dir() or root.is_symlink():
        return False
    for entry in root.iterdir():
        if entry.name == MANIFEST_NAME or is_partial_write(entry.name, MANIFEST_NAME):
            continue
        if not entry.is_dir() or entry.is_symlink():
            return False
        if any(not (f.is_file() and f.suffix == ".jpg") for f in entry.iterdir()):
            return False
    return True


def refuse_foreign(root: Path, is_ours: Callable[[Path], bool], builder: str) -> None:
    """Raise `FileExistsError` if `root` exists but is not (a stale or partial) build of ours."""
    if (root.exists() or root.is_symlink()) and not is_ours(root):
        raise FileExistsError(
            f"{root} exists and holds files that the {builder} builder did not write; "
            "refusing to replace it"
        )


def publish_folder(
    tmp: Path,
    root: Path,
    is_complete: Callable[[Path], bool],
    is_ours: Callable[[Path], bool],
    builder: str,
) -> None:
    """Rename the finished `tmp` folder to `root`, replacing a stale build, or keep a racer's.

    `is_complete` recognises a finished build (a racer's files are identical to ours) and
    `is_ours` a stale or partial one that may be deleted; anything else is refused.
    """
    last_error: OSError | None = None
    for _ in range(10):
        if is_complete(root):
            return  # another process finished first; its files are identical to ours
        try:
            os.rename(tmp, root)  # atomic; succeeds when `root` is absent or an empty folder
            return
        except OSError as exc:
            last_error = exc
            if not root.exists() and not root.is_symlink():
                continue  # a racer moved `root` aside meanwhile; try again
        if is_complete(root):
            return
        refuse_foreign(root, is_ours, builder)
        stale = root.with_name(f".{root.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(root, stale)
        except FileNotFoundError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    message = f"could not move the {builder} build into place at {root}"
    raise RuntimeError(message) from last_error


def build_bundled_image_folder(
    root: str | os.PathLike[str],
    num_images: int = 512,
    min_side: int = 128,
    max_side: int = 256,
    seed: int = 0,
) -> Path:
    """Write `num_images` JPEG crops of the bundled photos to `root/<photo>/<k>.jpg`.

    Image `k` is a crop of photo `k mod P` (so every photo contributes), at a position, scale
    (10%..100% of the photo's area) and aspect ratio (3/4..4/3) drawn from a generator seeded by
    `(seed, k)`, resized so that its longer side is in `[min_side, max_side]`. A `MANIFEST.json`
    with the arguments, the sources and each file's size and SHA-256 is written last. If `root`
    already holds a complete build with the same arguments it is returned untouched.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if not (isinstance(min_side, int) and isinstance(max_side, int) and 1 <= min_side <= max_side):
        raise ValueError(
            f"need 1 <= min_side <= max_side (integers), got min_side={min_side!r}, "
            f"max_side={max_side!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    root = Path(root).expanduser().absolute()
    spec = _spec(num_images, min_side, max_side, seed)
    if _is_complete(root, spec):
        return root
    refuse_foreign(root, _is_our_leftover, "bundled data")  # fail before the work

    photos = _bundled_photos_with_sources()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files = []
        for k in range(num_images):
            name, photo, _ = photos[k % len(photos)]
            rng = np.random.default_rng([seed, k])
            box, size = _crop_box(rng, photo.width, photo.height, min_side, max_side)
            crop = photo.resize(size, Image.Resampling.BICUBIC, box=box)
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            data = buffer.getvalue()
            relative = f"{name}/{k:05d}.jpg"
            (tmp / name).mkdir(exist_ok=True)
            (tmp / relative).write_bytes(data)
            files.append(
                {
                    "path": relative,
                    "width": size[0],
                    "height": size[1],
                    "crop_box": list(box),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        manifest = {
            **spec,
            "sources": [
                {"name": name, "source": source, "width": photo.width, "height": photo.height}
                for name, photo, source in photos
            ],
            "files": files,
        }
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        publish_folder(tmp, root, lambda r: _is_complete(r, spec), _is_our_leftover, "bundled data")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("bundled data: wrote %d images to %s", num_images, root)
    return root
