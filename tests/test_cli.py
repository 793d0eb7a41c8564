"""The frame of every entry point (dupr_platform.cli): what Ctrl-C and SIGTERM end a command
with, and that starting Ray leaves the command's SIGTERM handler in place."""

import os
import signal
import time

import pytest

from dupr_platform import cli
from dupr_platform.cluster import PREEMPTION_WATCHER, start_ray, stop_ray


def _run_cli(run) -> int:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return cli.run_cli(lambda: None, run, lambda cfg: "cli-test")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_ends_a_command_with_one_line_and_status_143(capsys):
    def run(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this

    assert _run_cli(run) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: terminated; the same command resumes"


def test_ctrl_c_after_a_sigterm_is_ctrl_c_again(capsys):
    def run(cfg):
        raise KeyboardInterrupt

    _run_cli(lambda cfg: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(30))
    assert _run_cli(run) == 130  # the next command in this process: its own signals only
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: interrupted; the same command resumes"


@pytest.mark.slow  # starts Ray
def test_starting_ray_keeps_the_commands_sigterm_handler():
    """ray.init puts `sys.exit(15)` in a driver's place (and Ray's C++ handler before it): the
    command's handler must be the one SIGTERM reaches, or `ray job stop` skips its line."""
    previous = signal.signal(signal.SIGTERM, cli._terminate)
    try:
        start_ray("cli-test")
        assert signal.getsignal(signal.SIGTERM) is cli._terminate
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    finally:
        stop_ray()
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow  # starts Ray
def test_a_local_instance_starts_no_preemption_watcher():
    """A driver's own instance is one node that nothing drains: its workers (Ray Train's
    controller among them) have the preemption watcher switched off."""
    import ray

    @ray.remote(num_cpus=0)
    def switch() -> str | None:
        return os.environ.get(PREEMPTION_WATCHER)

    try:
        start_ray("cli-test")
        assert ray.get(switch.remote()) == "0"
        assert PREEMPTION_WATCHER not in os.environ  # the driver's environment is its own
    finally:
        stop_ray()
