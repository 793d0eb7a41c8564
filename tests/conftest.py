"""Shared fixtures: tiny configurations that run in seconds on two CPU cores."""

import os

import pytest
import torch

from dupr.config import DUPRConfig, OptimConfig, validate
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
    saved = {k: os.environ.get(k) for k in node_env}
    os.environ.update(node_env)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
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
