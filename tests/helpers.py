"""Small builders shared by the tests."""

import torch

from dupr.config import ModelConfig


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
