"""Eq. 7 and Eq. 8 against a direct float64 evaluation; chunked against direct log-sum-exp."""

import math

import pytest
import torch
import torch.nn.functional as F

from dupr.losses import info_nce, negatives_logsumexp


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def eq8_by_hand(v1, v2_pos, bank, tau):
    """Eq. 8 written out: −log exp(v1·v2₊/τ) / Σ_{j=0..K} exp(v1·v2_j/τ), j=0 the positive."""
    out = []
    for i in range(len(v1)):
        num = math.exp(float(v1[i] @ v2_pos[i]) / tau)
        den = num + sum(math.exp(float(v1[i] @ r) / tau) for r in bank)
        out.append(-math.log(num / den))
    return torch.tensor(out, dtype=torch.float64)


def eq7_by_hand(r1, r2, bank, tau):
    """Eq. 7 for one image: a sum over positions p of S×S cells (r: (S*S, d))."""
    return eq8_by_hand(r1, r2, bank, tau).sum()


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_image_loss_matches_eq8(tau):
    q, k, bank = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(50, 16, seed=3)
    loss, _ = info_nce(q, k, bank, tau)
    expected = eq8_by_hand(q, k, bank, tau)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


def test_patch_loss_matches_eq7_per_image_sum():
    s2, d = 9, 8
    r1, r2, bank = unit(3, s2, d, seed=4), unit(3, s2, d, seed=5), unit(40, d, seed=6)
    per_cell, _ = info_nce(r1.reshape(-1, d), r2.reshape(-1, d), bank, 0.2)
    per_image = per_cell.view(3, s2).sum(1)
    for i in range(3):
        expected = eq7_by_hand(r1[i], r2[i], bank, 0.2)
        assert abs(per_image[i].item() - expected.item()) <= 1e-6 * expected.item()


def test_accuracy_is_top1_of_positive_among_k_plus_1():
    q = unit(4, 8, seed=7)
    bank = unit(20, 8, seed=8)
    k = q.clone()
    k[2] = -q[2]  # positive pointing away: ranks last
    _, correct = info_nce(q, k, bank, 0.2)
    assert correct.tolist() == [True, True, False, True]


def test_chunked_equals_direct_in_value_and_gradient():
    q0, k, bank = unit(300, 32, seed=9), unit(300, 32, seed=10), unit(1000, 32, seed=11)
    results = []
    # inf → direct; a tiny budget forces chunks of a few keys, with a ragged last chunk.
    for budget in (math.inf, 300 * 1000 * 8 / 2**20 / 7.3):
        q = q0.clone().requires_grad_(True)
        loss, correct = info_nce(q, k, bank, 0.15, memory_mb=budget)
        (loss * torch.linspace(0.5, 1.5, len(loss), dtype=loss.dtype)).sum().backward()
        results.append((loss.detach(), correct, q.grad))
    (l_direct, c_direct, g_direct), (l_chunk, c_chunk, g_chunk) = results
    assert torch.allclose(l_chunk, l_direct, rtol=1e-12, atol=0)
    assert torch.equal(c_chunk, c_direct)
    assert torch.allclose(g_chunk, g_direct, rtol=1e-10, atol=1e-14)


def test_chunked_path_is_taken_and_handles_large_logits():
    # Large |logits| (τ small) would overflow a naive exp-sum: the streaming max must prevent it.
    q, bank = unit(64, 16, seed=12).requires_grad_(True), unit(500, 16, seed=13)
    lse_direct, max_direct = negatives_logsumexp(q, bank, 0.01)
    lse_chunk, max_chunk = negatives_logsumexp(q, bank, 0.01, memory_mb=64 * 500 * 8 / 2**20 / 5)
    assert torch.isfinite(lse_chunk).all()
    assert torch.allclose(lse_chunk, lse_direct, rtol=1e-12)
    assert torch.equal(max_chunk, max_direct)
    assert lse_chunk.grad_fn is not None and "ChunkedLogSumExp" in type(lse_chunk.grad_fn).__name__


def test_bank_gets_no_gradient_and_float32_inputs_are_computed_in_float32():
    q = unit(5, 8, seed=14, dtype=torch.bfloat16).requires_grad_(True)
    k = unit(5, 8, seed=15, dtype=torch.bfloat16)
    bank = unit(30, 8, seed=16, dtype=torch.float32)
    loss, _ = info_nce(q, k, bank, 0.2)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert q.grad is not None and bank.grad is None
