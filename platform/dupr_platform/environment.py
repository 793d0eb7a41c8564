"""Variables of this process's environment, set for the length of a block.

Ray and MLflow read some settings only from the environment (Ray's instance address, MLflow's
HTTP retries), and processes started meanwhile inherit it; the block's end restores exactly the
variables it set, so a change that someone else made meanwhile stays.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set `values` (None: remove the variable) in os.environ, restore those keys after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
