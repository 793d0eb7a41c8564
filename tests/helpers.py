"""Small builders shared by the tests."""

import time
from pathlib import Path

import torch

from dupr.config import DUPRConfig, ModelConfig, OptimConfig
from dupr.data import bundled_image_folder


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(
        backbone="resnet18",
        image_size=64,
        roi_size=(3, 3, 3, 2),
        queue_size=64,
        hidden_dim=32,
        embed_dim=16,
        patch_keys_per_enqueue=8,
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_batch(n: int, size: int, seed: int = 0, overlap: bool = True):
    """Views and crop records of n pairs; with overlap=False the crops are disjoint."""
    g = torch.Generator().manual_seed(seed)
    im_q = torch.randn(n, 3, size, size, generator=g)
    im_k = torch.randn(n, 3, size, size, generator=g)
    xy = torch.rand(n, 2, generator=g) * 50
    crop_q = torch.cat([xy, xy + 100, (torch.rand(n, 1, generator=g) < 0.5).float()], 1)
    shift = 30.0 if overlap else 150.0
    crop_k = torch.cat(
        [xy + shift, xy + shift + 100, (torch.rand(n, 1, generator=g) < 0.5).float()], 1
    )
    return im_q, im_k, crop_q, crop_k


def tiny_job(name: str, storage: str, tracking: str, epochs: int, workers: int = 2):
    """A 2-worker CPU pre-training job of the tiny model on 24 bundled images."""
    from dupr_platform.ray_pretrain import PretrainJob

    return PretrainJob(
        name=name,
        method=DUPRConfig(
            model=tiny_model_config(),
            optim=OptimConfig(lr=0.01, batch_size=8, epochs=epochs, amp=False),
        ),
        data=str(bundled_image_folder(24)),
        storage=storage,
        tracking_uri=tracking,
        experiment="ray-tests",
        num_workers=workers,
        cpus_per_worker=1,
        log_every=1,
        keep_checkpoints=2,
    ).validate()


# The smallest study that still runs every stage for real.
TOY_PIPELINE = [
    "pretrain.method.model.image_size=64",
    "pretrain.method.model.roi_size=[3,3,3,2]",
    "pretrain.method.model.queue_size=64",
    "pretrain.method.model.hidden_dim=32",
    "pretrain.method.model.embed_dim=16",
    "pretrain.method.model.patch_keys_per_enqueue=8",
    "pretrain.method.optim.batch_size=8",
    "pretrain.method.optim.epochs=1",
    "pretrain.method.optim.warmup_epochs=0",
    "pretrain.method.optim.amp=false",
    "pretrain.log_every=1",
    "eval.detection.iterations=3",
    "eval.detection.batch_size=2",
    "eval.detection.warmup_iters=1",
    "eval.detection.min_size=96",
    "eval.detection.max_size=128",
    "eval.spatial.max_images=3",
    "eval.spatial.rois_per_box=5",
    "eval.correspondence.max_images=2",
    "eval.correspondence.image_size=96",
    "eval.probe.image_size=64",
    "eval.probe.max_images=60",  # of 600/300: the SVM fits take seconds, not half a minute
    "eval.object_probe.max_images=8",
    # One pre-training per pipeline; test_pipeline.py runs the MoCo v2 baseline and seeds.
    "baselines.pretrain=[]",
]


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def sweep_config(tmp_path: Path, tracking: str, *extra: str) -> dict:
    """The ablate config at toy scale, with storage in tmp_path and sweep name toy-tau."""
    from dupr_platform.configs import compose

    return compose(
        CONFIGS,
        "ablate",
        [
            f"storage={tmp_path / 'storage'}",
            f"tracking_uri={tracking}",
            "experiment=sweep-tests",
            f"pretrain.data={bundled_image_folder(16)}",
            "sweep.name=toy-tau",
            *TOY_PIPELINE,
            *extra,
        ],
    )


def stage_context(tmp_path, name: str, config: dict, inputs: dict):
    """A stage body's context for calling it directly, outside a pipeline (no tracking)."""
    from dupr_platform.stages import StageContext

    return StageContext(
        name=name,
        kind=name.split("/")[0],
        key="k",
        config=config,
        inputs=inputs,
        storage_uri=str(tmp_path),
        folder=f"stages/{name.replace('/', '-')}-k",
        run_id="r",
        tracking_uri="sqlite:///unused.db",
        experiment="e",
    )


def until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def autoscaler_request() -> list | None:
    """What Ray's autoscaler is asked to make room for (`request_resources`), as it reads it:
    every requester's bundles, merged by Ray's autoscaling coordinator."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    found = _internal_kv_get(b"autoscaler_resource_request")
    return None if found is None else json.loads(found)


def waiting_requests() -> list[list[dict]]:
    """The bundles that each pre-training waiting to start asks an autoscaler for, as Ray's
    autoscaling coordinator holds them (the nodes' own shapes and Ray Train's left out)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    requests = ray.get(
        get_or_create_autoscaling_coordinator().__ray_call__.remote(
            lambda self: {k: r.requested_resources for k, r in self._ongoing_reqs.items()}
        )
    )
    return [bundles for k, bundles in requests.items() if k.startswith("dupr-waiting-")]
