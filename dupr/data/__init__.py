"""Data for DUPR pre-training: unlabeled image folders and the bundled, offline default set."""

from dupr.data.bundled import (
    build_bundled_image_folder,
    bundled_image_folder,
    bundled_photos,
    default_data_home,
)
from dupr.data.folder import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageFolderDataset,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageFolderDataset",
    "build_bundled_image_folder",
    "default_data_home",
    "bundled_image_folder",
    "bundled_photos",
]
