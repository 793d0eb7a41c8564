"""A short CPU pre-training on the bundled photographs whose loss goes down."""

import pytest
import torch

from dupr.config import DUPRConfig, OptimConfig, validate
from dupr.data import ImageFolderDataset, bundled_image_folder
from dupr.data.two_views import build_loader
from dupr.model import DUPR
from dupr.train import build_state, train
from dupr.views import TwoViews
from helpers import tiny_model_config


@pytest.mark.slow  # 10-14 s on 2 CPU cores
def test_short_pretraining_lowers_the_loss():
    # 256 images ≫ K = 64, so a sample's own older key is never among its negatives.
    cfg = validate(
        DUPRConfig(
            model=tiny_model_config(queue_size=64, momentum=0.99, embed_dim=32, hidden_dim=128),
            optim=OptimConfig(lr=0.01, batch_size=16, epochs=4, amp=False),
        )
    )
    torch.manual_seed(0)
    images = ImageFolderDataset(bundled_image_folder(256))
    loader = build_loader(images, TwoViews(64, cfg.augment), 16, num_workers=1)
    state = build_state(DUPR(cfg.model), cfg.optim, len(loader), torch.device("cpu"))
    logged: list[tuple[int, dict[str, float]]] = []
    train(
        state,
        loader,
        cfg.optim,
        torch.device("cpu"),
        log_every=8,
        on_log=lambda s, m: logged.append((s, m)),
    )
    assert [s for s, _ in logged] == list(range(8, 65, 8))
    # Steps 1–8 still see the random initial bank (easy negatives); the banks are full of real
    # keys from step 9 on (image banks after 4 steps, patch banks after 8).
    after_fill = logged[1][1]["loss"]
    final = (logged[-2][1]["loss"] + logged[-1][1]["loss"]) / 2
    assert final < after_fill - 0.3, [round(m["loss"], 2) for _, m in logged]
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for _, m in logged)
