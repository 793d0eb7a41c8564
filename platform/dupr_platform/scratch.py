"""Node-local scratch folders that do not outlive their process.

A stage writes its outputs (converted weights, plots) and a pre-training worker its checkpoint
into a temporary folder before they go to storage. `tempfile.TemporaryDirectory` removes the
folder when the block ends, but not when the process is killed: by Ray's memory monitor, by a
lost node's raylet, by SIGKILL. Those folders (converted weights: hundreds of MB; a
checkpoint: more) would pile up on the nodes that live on.

So each folder is locked (`flock`) by the process that made it, for as long as it is in use;
the kernel releases the lock when the process dies, however it dies. Whoever makes the next
scratch folder on that node, of any kind, removes the unlocked ones: the orphans. (Of any
kind: a node that lost a pre-training worker may run only evaluations afterwards.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Every scratch folder's name starts so; the kind follows (`dupr-scratch-stage-...`). Other
# folders of the project (the local stack's `dupr-stack-...`) are never locked: not swept.
PREFIX = "dupr-scratch-"


@contextlib.contextmanager
def scratch_folder(kind: str) -> Iterator[Path]:
    """A new folder `dupr-scratch-{kind}-*` in the system's temp folder, removed when the block
    ends; the orphans of earlier scratch folders on this node (their process died) are removed
    first."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another process's sweep took it for an orphan
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep holds it: then it is gone
        if path.is_dir():
            break
        os.close(fd)
    try:
        remove_orphans(keep=path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_orphans(keep: Path | None = None) -> list[Path]:
    """Remove the scratch folders in the temp folder that no living process holds; the
    removed ones."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if path == keep or not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # in use (or a file system without locks: then never removed)
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
