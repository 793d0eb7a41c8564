"""Shared fixtures: tiny configurations that run in seconds on two CPU cores.

Also the `slow` marker's rule (`make test-fast` runs ``-m "not slow"``): every test that uses a
fixture starting Ray or a real service (`local_ray`, and every fixture of services.py, directly
or through another fixture) is marked here; modules whose tests start such processes themselves
say so with ``pytestmark = pytest.mark.slow``. A test outside `slow` that starts Ray in this
process fails, so a missing mark cannot go unnoticed.
"""

import ast
import os
from pathlib import Path

import pytest
import torch

from dupr.config import DUPRConfig, OptimConfig, validate
from dupr_platform import software
from dupr_platform.environment import environment
from helpers import tiny_model_config

# Real services for the integration tests (S3 on moto, an MLflow server), shared by all modules.
pytest_plugins = ["services"]

# Tests never write the bundled data into the user's cache; one folder per session.
os.environ.setdefault(
    "DUPR_DATA_HOME", os.path.join(os.path.dirname(__file__), "..", "runs", "test-data")
)
# Console log files of the pipelines run in-process go there too, not into the user's runs/logs.
os.environ.setdefault(
    "DUPR_LOG_DIR", os.path.join(os.path.dirname(__file__), "..", "runs", "test-logs")
)
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without Ray's dashboard the Train state-actor reconciliation only logs failures.
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")


def pytest_report_header() -> str:
    """The CPU and its kernels head the log: the suite's time and the trained numbers the
    ranking tests check both depend on them (README, Tests)."""
    return (
        f"cpu: {software.cpu_model()}, {software.usable_cores()} usable cores; "
        f"torch kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )


def _fixtures_defined_in(path: Path) -> frozenset[str]:
    """Names of the functions decorated with ``pytest.fixture`` (with or without arguments)."""

    def is_fixture(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute | ast.Name) and ast.unparse(target) in (
            "pytest.fixture",
            "fixture",
        )

    tree = ast.parse(path.read_text())
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(map(is_fixture, node.decorator_list))
    )


# Fixtures that start Ray or a service process: the ones below, and all of services.py's.
SERVICE_FIXTURES = _fixtures_defined_in(Path(__file__).with_name("services.py")) | {"local_ray"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # `fixturenames` is the closure: fixtures used through other fixtures count too.
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _only_slow_tests_start_ray(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Fail a test that calls `ray.init` (itself, or through Ray's auto-init) without `slow`."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    import ray

    calls: list[str] = []
    real_init = ray.init

    def watched_init(*args, **kwargs):
        calls.append(repr(kwargs.get("address", args[0] if args else None)))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", watched_init)
    yield
    if calls:
        pytest.fail(
            f"{request.node.nodeid} started Ray (ray.init, address {calls[0]}) but is not "
            "marked slow: use the local_ray fixture or mark it @pytest.mark.slow",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray instance per test module (address="local": even if another Ray runs
    on this machine), 2 CPUs; stops only the instance it started.

    Its processes get the fake test credentials in their environment, as a node of a cluster
    has its own (the platform never hands credentials to Ray workers).
    """
    import ray

    from services import FAKE_KEY, FAKE_SECRET

    node_env = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    with environment(node_env):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_config() -> DUPRConfig:
    return validate(
        DUPRConfig(
            model=tiny_model_config(),
            optim=OptimConfig(lr=0.03, batch_size=8, epochs=2, amp=False),
        )
    )
