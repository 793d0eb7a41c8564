"""Error messages on one line, for console lines, MLflow tags and the messages of our own errors."""

from __future__ import annotations

from collections.abc import Callable

from dupr_platform.storage import scrub_secrets


def one_line(
    exc: BaseException,
    *,
    keep_line: Callable[[str], bool] | None = None,
    else_last_line: bool = False,
    limit: int | None = None,
    cut_mark: str = "",
) -> str:
    """`exc`'s message on one line, credentials scrubbed; the type's name when it is empty.

    pyarrow's AWS errors (which may echo settings), Ray's task errors and DataLoader workers'
    errors span lines. By default all lines are joined, whitespace squashed. `keep_line` keeps
    only the last line it accepts instead (under a traceback, the one that names the error); when
    it accepts none, the result is the last line if `else_last_line`, else the type's name. A
    text over `limit` characters is cut to end in `cut_mark`.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if keep_line is None:
        text = " ".join(" ".join(lines).split())
    else:
        kept = [line for line in lines if keep_line(line)]
        text = kept[-1] if kept else lines[-1] if lines and else_last_line else ""
    text = scrub_secrets(text) or type(exc).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - len(cut_mark)] + cut_mark
    return text
