"""What dupr writes: files that appear whole or not at all, and Markdown tables for reports.

Both serve dupr, dupr_platform and benchmarks alike. They live in dupr/ (plain Python, no
cluster packages) because the GPU benchmarks run with only the repository root on sys.path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

TEMP_SUFFIX = ".tmp"


def write_atomically(
    path: str | os.PathLike[str],
    content: bytes | str | Callable[[BinaryIO], object],
    *,
    fsync: bool = True,
) -> Path:
    """Write `path` so that readers see the old file or the new one, never a partial one.

    `content` is bytes, text (written as UTF-8) or a function that writes into the open binary
    file, e.g. `lambda f: torch.save(obj, f)`. It goes to a temporary file in the same folder
    (`os.replace` is atomic only within one file system), which is renamed over `path`. `fsync`
    flushes it to disk first, so that a power loss right after the rename cannot leave an empty
    file behind the new name. On any error the temporary file is removed and the error re-raised.
    Missing parent folders are created; the file gets the permissions `open` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            if isinstance(content, bytes):
                f.write(content)
            elif isinstance(content, str):
                f.write(content.encode("utf-8"))
            else:
                content(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_partial_write(name: str, target: str) -> bool:
    """Whether the file `name` is what an interrupted `write_atomically` of `target` left."""
    return name.startswith(f".{target}.") and name.endswith(TEMP_SUFFIX)


def markdown_table(
    rows: Iterable[Sequence[Any] | Mapping[str, Any]],
    columns: Sequence[str],
    *,
    number_format: str | None = None,
    missing: str = "",
    pad: bool = False,
) -> str:
    """A GitHub-flavoured Markdown table: a header of `columns`, a rule, one line per row.

    A row is a sequence of cells in column order, or a mapping read by column name (an absent
    key is a missing value). A missing value (None) shows as `missing`; a float in
    `number_format` when one is given (e.g. ".4g"); anything else as `str()` gives it. `pad`
    widens every column to its longest cell, so that the table also reads as plain text (on a
    console, in RESULTS.md). The text has no final newline.
    """

    def cell(value: Any) -> str:
        if value is None:
            return missing
        if number_format is not None and isinstance(value, float):
            return format(value, number_format)
        return str(value)

    def cells(row: Sequence[Any] | Mapping[str, Any]) -> list[str]:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else row
        return [cell(v) for v in values]

    body = [cells(row) for row in rows]
    header = [str(c) for c in columns]
    if pad:
        widths = [max(len(c) for c in column) for column in zip(header, *body, strict=True)]
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        widths = [0] * len(header)
        rule = "|" + "---|" * len(header)

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join([line(header), rule, *(line(r) for r in body)])
