"""Scratch folders of killed processes are removed by the next process that makes one, of
any kind (a node that lost a pre-training worker may run only evaluations afterwards).

Real processes, really killed (SIGKILL, as Ray's memory monitor or a lost raylet does): the
kernel's release of their locks is what tells an orphan from a folder in use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dupr_platform.scratch import scratch_folder

HOLD = """
import sys, time
from dupr_platform.scratch import scratch_folder
with scratch_folder(sys.argv[1]) as d:
    (d / "weights.pt").write_bytes(b"x" * 1000)
    print(d, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder, for this process and the ones it starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _holder(kind: str) -> tuple[subprocess.Popen, Path]:
    """A process inside a scratch folder of `kind`, and the folder."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_the_folder_is_gone_when_the_block_ends(temp_folder):
    with scratch_folder("stage") as d:
        (d / "out.json").write_text("{}")
        assert d.parent == temp_folder and d.name.startswith("dupr-scratch-stage-")
    assert not d.exists()
    with pytest.raises(RuntimeError), scratch_folder("stage") as d:
        raise RuntimeError("a failing stage")
    assert not d.exists()


def test_a_killed_process_folder_is_removed_by_the_next_one_a_living_one_kept(temp_folder):
    killed, orphan = _holder("checkpoints")  # a pre-training worker's
    living, in_use = _holder("stage")
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert (orphan / "weights.pt").exists()  # what a killed worker leaves behind
        stack = temp_folder / "dupr-stack-abc"  # a folder of another kind, never locked
        stack.mkdir()
        with scratch_folder("stage") as mine:  # an evaluation's, after the loss
            assert mine.exists()
            assert not orphan.exists()
            assert (in_use / "weights.pt").exists()  # its process holds it
            assert stack.exists()
        assert {p.name for p in temp_folder.iterdir()} == {stack.name, in_use.name}
    finally:
        for proc in (killed, living):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
