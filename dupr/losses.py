"""InfoNCE against a memory bank: image level (Eq. 8) and patch level (Eq. 7).

Both equations have the same per-query form

    ℓ(q) = -log  exp(q·k₊/τ) / ( exp(q·k₊/τ) + Σ_t exp(q·r_t/τ) ),

with k₊ the positive key and r_t the K keys in the bank. The sum over negatives is a
log-sum-exp over a (queries × K) logit matrix. At paper scale the patch queries of one GPU
(32 images × 196 cells on conv4) against K = 65536 keys make that matrix 1.6 GB in float32, so
above a memory budget it is computed in chunks of the bank with a streaming log-sum-exp and a
hand-written backward that recomputes each chunk (`ChunkedLogSumExp`); value and gradients
equal the direct form.

Losses are computed in float32 even under autocast: logits divided by τ = 0.15 are too coarse
in bfloat16.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp(q @ bank.T / τ, dim=1) without materialising the whole logit matrix.

    Forward keeps a running maximum and a rescaled running sum over chunks of the bank; backward
    recomputes each chunk's softmax. The bank is a constant (memory banks get no gradient).
    Also returns the row-wise maximum logit (no gradient) for top-1 accuracy.
    """

    @staticmethod
    def forward(ctx, q: Tensor, bank: Tensor, tau: float, chunk: int) -> tuple[Tensor, Tensor]:
        run_max = q.new_full((len(q),), -math.inf)
        run_sum = q.new_zeros(len(q))
        for start in range(0, len(bank), chunk):
            # In place: one (n × chunk) buffer at a time.
            logits = torch.mm(q, bank[start : start + chunk].T).div_(tau)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(
                new_max[:, None]
            ).exp_().sum(1)
            run_max = new_max
            del logits
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(q, bank, lse)
        ctx.tau, ctx.chunk = tau, chunk
        ctx.mark_non_differentiable(run_max)
        return lse, run_max

    @staticmethod
    def backward(ctx, grad_lse: Tensor, _grad_max: Tensor):
        q, bank, lse = ctx.saved_tensors
        grad_q = torch.zeros_like(q)
        weight = (grad_lse / ctx.tau)[:, None]
        for start in range(0, len(bank), ctx.chunk):
            keys = bank[start : start + ctx.chunk]
            probs = torch.mm(q, keys.T).div_(ctx.tau).sub_(lse[:, None]).exp_().mul_(weight)
            grad_q.addmm_(probs, keys)
            del probs
        return grad_q, None, None, None


def negatives_logsumexp(
    q: Tensor, bank: Tensor, tau: float, memory_mb: float = math.inf
) -> tuple[Tensor, Tensor]:
    """log Σ_t exp(q·r_t/τ) per query and the largest negative logit (for accuracy).

    Direct when the direct form fits in `memory_mb`, chunked otherwise. The direct form holds
    about four (n × K) buffers between forward and backward (logits, their exp inside
    logsumexp, the softmax and its product in backward); the chunked one a single (n × chunk)
    buffer at a time, sized to half the budget to leave room for the matmul's workspace.
    """
    n, k = len(q), len(bank)
    bytes_per_logit = q.element_size()
    if 4 * n * k * bytes_per_logit <= memory_mb * 2**20:
        logits = q @ bank.T / tau
        return torch.logsumexp(logits, dim=1), logits.detach().max(dim=1).values
    chunk = max(1, int(memory_mb * 2**20 / (2 * n * bytes_per_logit)))
    return ChunkedLogSumExp.apply(q, bank, tau, chunk)


def info_nce(
    q: Tensor, k_pos: Tensor, bank: Tensor, tau: float, memory_mb: float = math.inf
) -> tuple[Tensor, Tensor]:
    """Per-query InfoNCE loss (n,) and whether the positive ranks first among K+1 (n,) bool.

    q, k_pos: (n, d) L2-normalised; bank: (K, d) L2-normalised, no gradient.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 at least, float64 kept
    q, k_pos, bank = q.to(dtype), k_pos.to(dtype), bank.to(dtype)
    pos = (q * k_pos).sum(dim=1) / tau
    neg_lse, neg_max = negatives_logsumexp(q, bank, tau, memory_mb)
    loss = torch.logaddexp(pos, neg_lse) - pos
    return loss, pos.detach() > neg_max
