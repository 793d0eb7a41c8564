"""Eq. 7 and Eq. 8 against a direct float64 evaluation; chunked against direct log-sum-exp; the
speed options (bfloat16 logits, the attention kernel) against float32; float32 under autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from dupr.losses import ACCURACY_SAMPLE, BF16_LOGITS_BOUNDS, info_nce, negatives_logsumexp


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


def paper_like(n: int = 2048, k: int = 16384, d: int = 128):
    """Unit queries, positives near them and a bank of random keys (float32), as at τ = 0.15."""
    g = torch.Generator().manual_seed(17)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k_pos = F.normalize(q + 0.5 * torch.randn(n, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return q, k_pos, bank, torch.rand(n, generator=g)


def loss_and_grad(q0, k_pos, bank, weights, autocast: bool = False, **options):
    """Forward (under CPU bf16 autocast if asked), then backward outside it as in training."""
    q = q0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, correct = info_nce(q, k_pos, bank, 0.15, **options)
    (loss * weights).sum().backward()
    return loss.detach(), correct, q.grad


def relative(a, ref):
    """Largest per-query relative difference (as patch_loss_memory.py reports it)."""
    return float(((a - ref).abs() / ref.abs()).max())


def test_autocast_does_not_lower_the_losses_precision():
    """Autocast would run the logit matmuls in bfloat16; the losses switch it off."""
    q, k_pos, bank, w = paper_like(256, 2048)
    for budget in (math.inf, 1.0):  # direct and chunked
        ref = loss_and_grad(q, k_pos, bank, w, memory_mb=budget)
        under = loss_and_grad(q, k_pos, bank, w, autocast=True, memory_mb=budget)
        assert under[0].dtype == torch.float32
        assert torch.equal(under[0], ref[0]) and torch.equal(under[2], ref[2])


@pytest.mark.parametrize("budget", [math.inf, 16.0], ids=["direct", "chunked"])
def test_bfloat16_logits_stay_within_bounds_of_float32(budget):
    """bfloat16 matmul inputs with float32 accumulation: measured 3.8e-5 (loss) and 2.4e-4
    (gradient) here, against 6e-3 and 2e-3 for the bfloat16 log-sum-exp autocast gave."""
    q, k_pos, bank, w = paper_like()
    loss32, correct32, grad32 = loss_and_grad(q, k_pos, bank, w, memory_mb=budget)
    loss16, correct16, grad16 = loss_and_grad(
        q, k_pos, bank, w, memory_mb=budget, logits_dtype=torch.bfloat16
    )
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.float32
    loss_bound, grad_bound = BF16_LOGITS_BOUNDS
    assert relative(loss16, loss32) <= loss_bound
    assert abs(float(loss16.mean() / loss32.mean()) - 1) <= 1e-5
    assert float((grad16 - grad32).abs().max() / grad32.abs().max()) <= grad_bound
    assert (correct16 != correct32).float().mean() <= 0.01


@pytest.mark.parametrize("logits_dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_kernel_gives_the_matmul_losses_and_gradients(logits_dtype):
    q, k_pos, bank, w = paper_like(n=3000)
    loss_m, correct_m, grad_m = loss_and_grad(
        q, k_pos, bank, w, memory_mb=16.0, logits_dtype=logits_dtype
    )
    loss_a, correct_a, grad_a = loss_and_grad(
        q, k_pos, bank, w, kernel="attention", logits_dtype=logits_dtype
    )
    loss_bound, grad_bound = (1e-6, 1e-6) if logits_dtype is None else BF16_LOGITS_BOUNDS
    assert relative(loss_a, loss_m) <= loss_bound
    assert float((grad_a - grad_m).abs().max() / grad_m.abs().max()) <= grad_bound
    # Accuracy on an evenly spaced sample: every 3rd query of 3000 gives 1000 <= 1024.
    assert len(correct_a) == 1000 <= ACCURACY_SAMPLE
    assert torch.equal(correct_a, correct_m[::3])


def test_unknown_kernel_is_refused():
    q, k_pos, bank, _ = paper_like(8, 16)
    with pytest.raises(ValueError, match="kernel='flash'"):
        info_nce(q, k_pos, bank, 0.2, kernel="flash")


def test_cudnn_attention_runs_as_attention_on_a_cpu():
    """model.patch_loss_kernel=cudnn_attention is a GPU kernel choice: a configuration that
    names it trains the same on a laptop (tests/test_cuda.py checks cuDNN's kernel itself)."""
    q, k_pos, bank, w = paper_like(n=500)
    options = dict(memory_mb=16.0, logits_dtype=torch.bfloat16)
    loss_a, correct_a, grad_a = loss_and_grad(q, k_pos, bank, w, kernel="attention", **options)
    loss_c, correct_c, grad_c = loss_and_grad(
        q, k_pos, bank, w, kernel="cudnn_attention", **options
    )
    assert torch.equal(loss_c, loss_a) and torch.equal(grad_c, grad_a)
    assert torch.equal(correct_c, correct_a)
