"""The DUPR model: heads per non-zero weight, momentum encoder, key path, banks, MoCo v2 preset."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dupr.config import LEVELS, preset
from dupr.geometry import shortest_side, view_boxes
from dupr.losses import BF16_LOGITS_BOUNDS, info_nce
from dupr.model import DUPR
from dupr.sync_batchnorm import SyncBatchNorm
from helpers import random_batch, tiny_model_config


def test_heads_are_built_only_for_nonzero_weights():
    model = DUPR(tiny_model_config(alpha=(0, 0, 0.5, 1), beta=(0, 0, 0, 1)))
    assert set(model.encoder_q.image_heads) == {"conv4", "conv5"}
    assert set(model.encoder_q.patch_heads) == {"conv5"}
    assert set(model.banks) == {"image_conv4", "image_conv5", "patch_conv5"}
    full = DUPR(tiny_model_config(alpha=(1, 1, 1, 1), beta=(1, 1, 1, 1)))
    assert len(full.banks) == 8  # up to 4 image-level and 4 patch-level banks


def test_default_dupr_has_paper_structure():
    cfg = preset("dupr").model
    assert (cfg.alpha, cfg.beta, cfg.tau, cfg.queue_size) == (
        (0.1, 0.4, 0.7, 1.0),
        (0, 0, 1, 1),
        0.15,
        65536,
    )
    assert cfg.roi_size[2:] == (14, 7) and cfg.momentum == 0.999


def test_momentum_update_over_parameters():
    model = DUPR(tiny_model_config(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(torch.randn_like(p))
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    k_buffers = {n: b.clone() for n, b in model.encoder_k.named_buffers()}
    model.momentum_update()
    for q, k0, k1 in zip(q_before, k_before, model.encoder_k.parameters(), strict=True):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-6)
    for n, b in model.encoder_k.named_buffers():  # BN statistics are not averaged
        assert torch.equal(b, k_buffers[n])


def test_key_path_has_no_gradient_and_query_path_has():
    model = DUPR(tiny_model_config())
    loss, metrics = model(*random_batch(4, 64))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert all(b.grad is None for b in model.buffers())
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None, name
    assert torch.isfinite(loss) and set(metrics) >= {"loss", "loss/image_conv5", "loss/patch_conv4"}


def test_total_loss_is_eq2_weighted_sum():
    cfg = tiny_model_config(alpha=(0.1, 0.4, 0.7, 1.0), beta=(0, 0, 1, 0.5))
    _, m = DUPR(cfg)(*random_batch(4, 64))
    expected = sum(a * m[f"loss/image_{lv}"] for a, lv in zip(cfg.alpha, LEVELS, strict=True))
    expected = expected + m["loss/patch_conv4"] + 0.5 * m["loss/patch_conv5"]
    assert torch.allclose(m["loss"], expected, rtol=1e-6)


def test_banks_enqueue_batch_keys_and_sampled_patch_keys_after_the_loss():
    model = DUPR(tiny_model_config(queue_size=20, patch_keys_per_enqueue=8))
    before = {n: b.keys.clone() for n, b in model.banks.items()}
    model(*random_batch(6, 64))
    assert model.banks["image_conv5"].ptr.item() == 6
    assert model.banks["patch_conv4"].ptr.item() == 8  # 8 sampled of 6·3·3 valid cells
    model(*random_batch(6, 64, seed=1))
    model(*random_batch(6, 64, seed=2))
    assert model.banks["image_conv5"].ptr.item() == 18 % 20
    assert model.banks["patch_conv4"].ptr.item() == 24 % 20  # wrapped around
    for n, b in model.banks.items():
        assert not torch.equal(b.keys, before[n])
        assert torch.allclose(b.keys.norm(dim=1), torch.ones(20), atol=1e-5)


def test_patch_loss_over_every_cell_weighted_by_validity_equals_the_valid_cells_mean():
    """The loss runs on all N·S² cells (no host sync) and must equal Eq. 7 on the valid ones."""
    model = DUPR(tiny_model_config())
    g = torch.Generator().manual_seed(3)
    r_q = F.normalize(torch.randn(5, 16, 3, 3, generator=g), dim=1).requires_grad_()
    r_k = F.normalize(torch.randn(5, 16, 3, 3, generator=g), dim=1)
    valid = torch.tensor([True, False, True, True, False])
    loss, acc = model.patch_loss("conv4", r_q, r_k, valid, valid.sum())
    loss.backward()
    q = r_q.flatten(2).transpose(1, 2)[valid].flatten(0, 1)
    k = r_k.flatten(2).transpose(1, 2)[valid].flatten(0, 1)
    losses, correct = info_nce(q, k, model.banks["patch_conv4"].keys, model.cfg.tau)
    assert torch.allclose(loss, losses.mean(), rtol=1e-6)
    assert acc == correct.float().mean()
    assert r_q.grad is not None and torch.all(r_q.grad[~valid] == 0)


def test_sampled_patch_keys_come_only_from_overlapping_pairs():
    model = DUPR(tiny_model_config(patch_keys_per_enqueue=30))
    r = torch.zeros(3, 16, 3, 3)
    r[1] = 1.0  # only pair 1 overlaps
    overlap = torch.tensor([False, True, False])
    keys, flags = model.sample_patch_keys(r, overlap)
    assert keys.shape == (30, 16) and flags.tolist() == [True] * 9 + [False] * 21  # valid first
    assert torch.all(keys[:9] == 1.0)  # all 9 valid cells, no duplicates
    bank = model.banks["patch_conv4"]
    before = bank.keys.clone()
    bank.enqueue(keys, flags)
    assert bank.ptr.item() == 9  # the padding is not enqueued
    assert torch.equal(bank.keys[9:], before[9:])


def test_batch_without_any_overlap_gives_finite_connected_loss():
    model = DUPR(tiny_model_config())
    batch = random_batch(4, 64, overlap=False)
    assert not view_boxes(batch[2], batch[3], 64)[2].any()
    ptr = model.banks["patch_conv4"].ptr.item()
    loss, metrics = model(*batch)
    assert torch.isfinite(loss)
    assert metrics["loss/patch_conv4"] == 0
    loss.backward()
    for p in model.encoder_q.patch_heads.parameters():
        assert p.grad is not None and torch.all(p.grad == 0)
    assert model.banks["patch_conv4"].ptr.item() == ptr  # nothing to enqueue


def test_a_thin_flipped_overlap_counts_only_at_the_levels_whose_cells_it_spans():
    """B 24 px wide in both views: one conv4 cell (16 px) fits, no conv5 cell (32 px) does.

    RoIAlign (aligned=False) would widen the conv5 RoI from its left edge in each view, which in
    the flipped view is the other side of B: those grids are not the same patch, not positives.
    """
    model = DUPR(tiny_model_config(queue_size=64, patch_keys_per_enqueue=8))
    n, size = 4, 64
    g = torch.Generator().manual_seed(0)
    im_q, im_k = (
        torch.randn(n, 3, size, size, generator=g),
        torch.randn(n, 3, size, size, generator=g),
    )
    crop_q = torch.tensor([[0.0, 0.0, 64.0, 64.0, 1.0]]).repeat(n, 1)  # flipped, scale 1
    crop_k = torch.tensor([[40.0, 0.0, 104.0, 64.0, 0.0]]).repeat(n, 1)  # B = [40, 64] x [0, 64]
    box_q, box_k, overlap = view_boxes(crop_q, crop_k, size)
    assert overlap.all() and torch.allclose(box_q[:, 2] - box_q[:, 0], torch.tensor(24.0))
    ptr5 = model.banks["patch_conv5"].ptr.item()
    loss, metrics = model(im_q, im_k, crop_q, crop_k)
    assert torch.isfinite(loss)
    assert metrics["valid/patch_conv4"] == 1 and metrics["loss/patch_conv4"] > 0
    assert metrics["valid/patch_conv5"] == 0 and metrics["loss/patch_conv5"] == 0
    assert model.banks["patch_conv5"].ptr.item() == ptr5  # no conv5 key from these pairs
    assert model.banks["patch_conv4"].ptr.item() == 8


def test_shortest_side_of_a_pair_in_view_pixels():
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 31.9, 40.0], [5.0, 5.0, 45.0, 36.9]])
    wide = torch.tensor([[0.0, 0.0, 50.0, 50.0]]).expand(3, 4)
    assert shortest_side(boxes, wide).tolist() == pytest.approx([32.0, 31.9, 31.9])
    assert shortest_side(wide, boxes).tolist() == pytest.approx([32.0, 31.9, 31.9])
    narrow = torch.tensor([[10.0, 10.0, 60.0, 30.0]]).expand(3, 4)  # 20 pixels high
    assert shortest_side(boxes, narrow).tolist() == pytest.approx([20.0, 20.0, 20.0])


def test_patch_loss_averages_over_valid_cells_only():
    # eval(): BatchNorm then does not depend on the batch, so sub-batches are comparable.
    model = DUPR(tiny_model_config(alpha=(0, 0, 0, 1), beta=(0, 0, 1, 0))).eval()
    good = random_batch(4, 64, seed=3)
    bad = random_batch(4, 64, seed=3, overlap=False)
    mixed = [torch.cat([g[:2], b[2:]]) for g, b in zip(good, bad, strict=True)]
    m_good = copy.deepcopy(model)
    _, m = model(*mixed)
    # The loss of the mixed batch equals that of its two overlapping pairs alone.
    _, m2 = m_good(*[t[:2] for t in good])
    assert torch.allclose(m["loss/patch_conv4"], m2["loss/patch_conv4"], rtol=1e-5)


def moco_v2_reference(model: DUPR, im_q, im_k, tau):
    """MoCo v2 as its builder computes it, on torchvision ResNets carrying our weights."""
    cfg = model.cfg

    def as_moco_encoder(enc):
        net = torchvision.models.__dict__[cfg.backbone](num_classes=cfg.embed_dim)
        mlp = enc.image_heads["conv5"].mlp
        net.fc = torch.nn.Sequential(copy.deepcopy(mlp[0]), torch.nn.ReLU(), copy.deepcopy(mlp[2]))
        missing, unexpected = net.load_state_dict(enc.backbone.state_dict(), strict=False)
        assert (
            set(missing) == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
            and not unexpected
        )
        return net.train()

    m = cfg.momentum
    enc_q = as_moco_encoder(model.encoder_q)
    enc_k = as_moco_encoder(model.encoder_k)
    with torch.no_grad():  # MoCo: momentum update, then keys
        for pk, pq in zip(enc_k.parameters(), enc_q.parameters(), strict=True):
            pk.mul_(m).add_(pq, alpha=1 - m)
    queue = model.banks["image_conv5"].keys.T.clone()  # MoCo stores the queue as (dim, K)
    q = F.normalize(enc_q(im_q), dim=1)
    with torch.no_grad():
        k = F.normalize(enc_k(im_k), dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)), k


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_mocov2_preset_equals_plain_moco_v2(backbone):
    base = preset("mocov2").model
    cfg = tiny_model_config(
        backbone=backbone,
        alpha=base.alpha,
        beta=base.beta,
        tau=base.tau,
        hidden_dim=None,
        momentum=0.9,
    )
    torch.manual_seed(0)
    model = DUPR(cfg)
    assert set(model.banks) == {"image_conv5"} and not model.encoder_q.patch_heads
    with torch.no_grad():  # make the key encoder differ so the momentum step matters
        for p in model.encoder_k.parameters():
            p.add_(0.01 * torch.randn_like(p))
    im_q, im_k, crop_q, crop_k = random_batch(4, 64, seed=5)
    ref_loss, ref_k = moco_v2_reference(model, im_q, im_k, cfg.tau)
    loss, _ = model(im_q, im_k, crop_q, crop_k)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss.item(), ref_loss.item())
    # ... and enqueued MoCo's keys.
    assert torch.allclose(model.banks["image_conv5"].keys[:4], ref_k, atol=2e-4)


def test_syncbn_mode_builds_sync_batchnorm_and_runs_in_one_process():
    model = DUPR(tiny_model_config(bn_mode="sync"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, SyncBatchNorm) for m in norms)
    loss, _ = model(*random_batch(4, 64))  # without a process group it normalises like BatchNorm
    assert torch.isfinite(loss)


def test_mixed_precision_forward_keeps_losses_and_banks_in_float32():
    # CPU autocast exercises the same dtype paths as bf16 autocast on a GPU.
    model = DUPR(tiny_model_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(*random_batch(4, 64))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(b.keys.dtype == torch.float32 for b in model.banks.values())
    assert all(
        torch.allclose(b.keys.norm(dim=1), torch.ones(len(b.keys))) for b in model.banks.values()
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(patch_logits="bfloat16"),
        dict(patch_loss_kernel="attention"),
        dict(roi_align_kernel="matmul"),
        dict(patch_loss_kernel="cudnn_attention", patch_logits="bfloat16"),
    ],
    ids=["bfloat16 logits", "attention kernel", "matmul RoIAlign", "cuDNN attention"],
)
def test_patch_loss_options_train_like_the_default(options):
    """The config's speed options reach the patch path and change it only by rounding."""
    results = []
    for overrides in ({}, options):
        torch.manual_seed(0)
        model = DUPR(tiny_model_config(queue_size=512, **overrides))
        for bank in model.banks.values():  # a full bank, so every key is a real negative
            bank.enqueue(F.normalize(torch.randn(512, bank.keys.shape[1]), dim=1))
        torch.manual_seed(1)
        loss, metrics = model(*random_batch(4, 64))
        loss.backward()
        grad = model.encoder_q.patch_heads["conv4"].mlp[0].weight.grad
        results.append((loss.detach(), metrics, grad))
    (loss, metrics, grad), (loss_o, metrics_o, grad_o) = results
    assert not torch.equal(grad_o, grad)  # the option was used ...
    loss_bound, grad_bound = BF16_LOGITS_BOUNDS  # ... and changed only the rounding
    assert abs(float(loss_o / loss) - 1) <= loss_bound
    assert float((grad_o - grad).abs().max() / grad.abs().max()) <= grad_bound
    for name in ("conv4", "conv5"):
        assert torch.isfinite(metrics_o[f"acc/patch_{name}"])


def test_patch_head_is_the_papers_1x1_convolutions_on_the_unmirrored_roi_grid():
    """Eq. 5–6 as written: RoIAlign, mirror flipped views' grids back, then g as 1×1
    convolutions. The head runs g on the cells as rows and mirrors its output instead; the
    result must be the same numbers, in a layout whose flattened cells are a view."""
    from torchvision.ops import roi_align

    from dupr.geometry import unflip_grid
    from dupr.heads import PatchHead

    torch.manual_seed(0)
    head = PatchHead(24, 32, 16, roi_size=5, stride=8)
    feat = torch.randn(6, 24, 12, 12).contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[8.0, 8.0, 90.0, 70.0], [0.0, 0.0, 96.0, 96.0]]).repeat(3, 1)
    crops = torch.zeros(6, 5)
    crops[::2, 4] = 1.0  # every other view mirrored
    rois = torch.cat([torch.arange(6.0)[:, None], boxes], 1)
    pooled = unflip_grid(roi_align(feat, rois, 5, spatial_scale=1 / 8, sampling_ratio=2), crops)
    conv1, conv2 = head.mlp[0], head.mlp[2]
    hidden = F.relu(F.conv2d(pooled, conv1.weight[..., None, None], conv1.bias))
    want = F.conv2d(hidden, conv2.weight[..., None, None], conv2.bias)

    got = head(feat, boxes, crops)
    assert got.shape == (6, 16, 5, 5)
    assert torch.allclose(got, want, atol=1e-5)
    rows = got.flatten(2).transpose(1, 2).flatten(0, 1)  # as DUPR.patch_loss reads them
    assert rows.data_ptr() == got.data_ptr() and rows.is_contiguous()

    # A checkpoint of the heads as 1×1 convolutions loads into the Linear layers.
    conv_state = {
        k: v[..., None, None] if v.dim() == 2 else v for k, v in head.state_dict().items()
    }
    fresh = PatchHead(24, 32, 16, roi_size=5, stride=8)
    fresh.load_state_dict(conv_state)
    assert torch.equal(fresh(feat, boxes, crops), got)


def test_the_encoder_normalises_every_embedding_as_one_call_per_head_would():
    """`normalize_rows` puts the heads' rows through one F.normalize: the same values and
    gradients as one call per head, image embeddings and patch grids in their own shapes
    and cell-major layout."""
    from dupr.heads import normalize_rows

    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 16, generator=g, dtype=torch.float64).requires_grad_()
    grid = torch.randn(4, 5, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    unit_image, unit_grid = normalize_rows(image, grid)
    assert unit_image.shape == (4, 16) and unit_grid.shape == (4, 5, 5, 16)
    assert torch.allclose(unit_image, F.normalize(image, dim=1), atol=1e-15)
    assert torch.allclose(unit_grid, F.normalize(grid, dim=3), atol=1e-15)
    up_image, up_grid = torch.randn(4, 16, generator=g), torch.randn(4, 5, 5, 16, generator=g)
    grads = torch.autograd.grad(
        (unit_image * up_image).sum() + (unit_grid * up_grid).sum(), (image, grid)
    )
    want = torch.autograd.grad(
        (F.normalize(image, dim=1) * up_image).sum() + (F.normalize(grid, dim=3) * up_grid).sum(),
        (image, grid),
    )
    for got, expected in zip(grads, want, strict=True):
        assert torch.allclose(got, expected, atol=1e-12)

    model = DUPR(tiny_model_config())
    im_q, _, crop_q, _ = random_batch(2, 64)
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(2, 4)
    image_q, patch_q = model.encoder_q(im_q, box, crop_q)
    for v in [*image_q.values(), *patch_q.values()]:
        assert torch.allclose(v.norm(dim=1), torch.ones(()), atol=1e-5)
    for r in patch_q.values():  # (N, d, S, S) whose (N·S², d) rows are a view
        assert r.permute(0, 2, 3, 1).is_contiguous()
