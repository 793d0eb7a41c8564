"""The shared command-line wrapper of the pipelines: compose, run, map errors to exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dupr.config import ConfigError
from dupr.convert import ConversionError
from dupr.data.coco import CocoFormatError
from dupr_platform.configs import compose
from dupr_platform.storage import StorageError
from dupr_platform.tracking import TrackingError

# Bad input found before any stage ran: one line on stderr, exit status 2.
INPUT_ERRORS = (
    ConfigError,
    ConversionError,
    CocoFormatError,
    StorageError,
    TrackingError,
    FileNotFoundError,
    NotADirectoryError,
)


def run_cli(
    config_dir: Path, config_name: str, overrides: list[str], run: Callable[[dict[str, Any]], Any]
) -> int:
    try:
        cfg = compose(config_dir, config_name, overrides)
        result = run(cfg)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1
