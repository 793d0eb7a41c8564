"""Data for DUPR pre-training: unlabeled image folders and the embedded, offline default set."""

from dupr.data.embedded import (
    build_embedded_image_folder,
    default_data_home,
    embedded_image_folder,
    embedded_photos,
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
    "build_embedded_image_folder",
    "default_data_home",
    "embedded_image_folder",
    "embedded_photos",
]
