"""InfoNCE against a memory bank: image level (Eq. 8) and patch level (Eq. 7).

Both equations have the same per-query form

    ℓ(q) = -log  exp(q·k₊/τ) / ( exp(q·k₊/τ) + Σ_t exp(q·r_t/τ) ),

with k₊ the positive key and r_t the K keys in the bank. The sum over negatives is a
log-sum-exp over a (queries × K) logit matrix. At paper scale the patch queries of one GPU
(32 images × 196 cells on conv4) against K = 65536 keys make that matrix 1.6 GB in float32, so
above a memory budget it is computed in chunks of the bank with a streaming log-sum-exp and a
hand-written backward that recomputes each chunk (`ChunkedLogSumExp`); value and gradients
equal the direct form.

Losses are computed in float32 even under autocast (autocast is switched off inside `info_nce`:
it would otherwise run the logit matmuls in bfloat16 and return a bfloat16 log-sum-exp, whose
step near log K ≈ 11 is 0.06). Two options trade exactness for speed on a GPU's tensor cores:

- ``logits_dtype=torch.bfloat16``: the q·r matmuls take bfloat16 inputs; the logits, the
  log-sum-exp and the gradient are accumulated in float32 (tests/test_losses.py bounds the
  difference to float32);
- ``kernel="attention"``: the negatives' log-sum-exp and its gradient come from PyTorch's fused
  attention kernel, which never writes the logit matrix to memory. With the bank as both keys
  and values, attention returns o = softmax(q·Rᵀ/τ)·R and log Σ_t exp(q·r_t/τ), and
  ∂ lse / ∂q = o / τ, so the backward pass is one multiplication. ``kernel="cudnn_attention"``
  takes cuDNN's attention kernel instead of PyTorch's flash attention (bfloat16 logits only);
  which one is faster depends on the card (benchmarks/gpu_step.py has a row for each).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dupr.config import PATCH_LOSS_KERNELS

# With kernel="attention" the kernel gives no maximum logit; top-1 accuracy is measured on an
# evenly spaced sample of at most this many queries (a metric only, the loss uses all).
ACCURACY_SAMPLE = 1024
# What the bfloat16-logits option promises against float32, per query: the loss's relative
# difference and the gradient's max difference / max gradient (measured at paper scale on the
# CPU: 3.4e-5 and 2.2e-4). The tests, the GPU tests and patch_loss_memory hold it to these.
BF16_LOGITS_BOUNDS = (1e-4, 1e-3)


class ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp(q @ bank.T, dim=1) without materialising the whole logit matrix (q comes
    divided by τ already: one pass over the n × d queries instead of one over every n × chunk
    block of logits, forward and backward).

    Forward keeps a running maximum and a rescaled running sum over chunks of the bank; backward
    recomputes each chunk's softmax. The bank is a constant (memory banks get no gradient).
    q and bank may be bfloat16: the matmuls then run in bfloat16, and everything after them
    (logits, running sums, gradient) in float32. Also returns the row-wise maximum logit (no
    gradient) for top-1 accuracy.
    """

    @staticmethod
    def forward(ctx, q: Tensor, bank: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        acc = torch.promote_types(q.dtype, torch.float32)  # what the logits are summed in
        run_max = q.new_full((len(q),), -math.inf, dtype=acc)
        run_sum = q.new_zeros(len(q), dtype=acc)
        for start in range(0, len(bank), chunk):
            # In place: one (n × chunk) buffer at a time (.to is a no-op where q is float32).
            logits = torch.mm(q, bank[start : start + chunk].T).to(acc)
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(
                new_max[:, None]
            ).exp_().sum(1)
            run_max = new_max
            del logits
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(q, bank, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(run_max)
        return lse, run_max

    @staticmethod
    def backward(ctx, grad_lse: Tensor, _grad_max: Tensor):
        q, bank, lse = ctx.saved_tensors
        acc = lse.dtype
        # ∂lse/∂q = Σ_t softmax_t · r_t; the upstream gradient weighs each row once, at the end,
        # rather than every element of every chunk's softmax.
        expected = torch.zeros(q.shape, dtype=acc, device=q.device)
        for start in range(0, len(bank), ctx.chunk):
            keys = bank[start : start + ctx.chunk]
            probs = torch.mm(q, keys.T).to(acc).sub_(lse[:, None]).exp_()
            if keys.dtype == acc:
                expected.addmm_(probs, keys)
            else:  # the matmul in the bank's (bfloat16) precision, its sum over chunks in float32
                expected += torch.mm(probs.to(keys.dtype), keys).to(acc)
            del probs
        return (grad_lse[:, None] * expected).to(q.dtype), None, None


class AttentionLogSumExp(torch.autograd.Function):
    """log Σ_t exp(q·r_t/τ) by a fused attention kernel, with the bank as keys and values.

    The kernel streams the bank through on-chip memory and returns the log-sum-exp with
    o = softmax(q·Rᵀ/τ)·R, which is τ times the gradient: backward is `grad · o / τ`. `cudnn`:
    cuDNN's attention kernel on a GPU instead of flash attention.
    """

    @staticmethod
    def forward(ctx, q: Tensor, bank: Tensor, tau: float, cudnn: bool) -> Tensor:
        out, lse = _attention(q, bank, 1.0 / tau, cudnn)
        ctx.save_for_backward(out)
        ctx.tau = tau
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):
        (out,) = ctx.saved_tensors
        return (grad_lse / ctx.tau)[:, None] * out.to(grad_lse.dtype), None, None, None


def _attention(q: Tensor, bank: Tensor, scale: float, cudnn: bool) -> tuple[Tensor, Tensor]:
    """(softmax(q·bankᵀ·scale)·bank, float32 log-sum-exp) from PyTorch's attention kernels.

    The public `scaled_dot_product_attention` returns only the output, so this calls the
    kernels it dispatches to, which also return the log-sum-exp: flash attention for
    bfloat16/float16 on a GPU (cuDNN's kernel where `cudnn`), the memory-efficient kernel for
    float32 on a GPU, and the CPU flash kernel (any of these dtypes) on a CPU. Shapes are
    (batch 1, heads 1, length, d).
    """
    q4, k4 = q[None, None], bank[None, None]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q4, k4, k4, scale=scale
        )
    elif cudnn:
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cuDNN's attention takes bfloat16 or float16, not {q.dtype}")
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k4, k4, None, True, scale=scale
        )[:2]
    elif q.dtype in (torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, k4, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q4, k4, k4, None, True, scale=scale
        )[:2]
    # The memory-efficient kernel pads the log-sum-exp's length to a multiple of 32; cuDNN's
    # comes as (1, 1, length, 1).
    lse = lse.reshape(-1)[: len(q)]
    return out[0, 0], lse.to(torch.promote_types(q.dtype, torch.float32))


def negatives_logsumexp(
    q: Tensor,
    bank: Tensor,
    tau: float,
    memory_mb: float = math.inf,
    logits_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """log Σ_t exp(q·r_t/τ) per query and the largest negative logit (for accuracy).

    `logits_dtype` (bfloat16) casts q and the bank for the matmuls; None keeps their precision.

    Direct when the direct form fits in `memory_mb`, chunked otherwise. The direct form holds
    about four (n × K) buffers between forward and backward (logits, their exp inside
    logsumexp, the softmax and its product in backward); the chunked one a single (n × chunk)
    float32 buffer at a time, sized to half the budget to leave room for the matmul's workspace
    (and, with bfloat16 logits, the matmul's bfloat16 output).
    """
    n, k = len(q), len(bank)
    accumulate = torch.promote_types(q.dtype, torch.float32)
    q = q / tau  # on the n × d queries, before any cast, not on the n × K logits
    if logits_dtype is not None:
        q, bank = q.to(logits_dtype), bank.to(logits_dtype)
    chunk = logsumexp_chunk(n, k, memory_mb, torch.finfo(accumulate).bits // 8)
    if chunk is None:
        logits = (q @ bank.T).to(accumulate)
        return torch.logsumexp(logits, dim=1), logits.detach().max(dim=1).values
    return ChunkedLogSumExp.apply(q, bank, chunk)


def logsumexp_chunk(n: int, k: int, memory_mb: float, bytes_per_logit: int = 4) -> int | None:
    """Bank keys per chunk for n queries against k keys within `memory_mb`; None: direct form.

    The direct form holds about four (n × k) buffers; a chunk's (n × chunk) buffer gets half
    the budget (see `negatives_logsumexp`).
    """
    if 4 * n * k * bytes_per_logit <= memory_mb * 2**20:
        return None
    return max(1, int(memory_mb * 2**20 / (2 * n * bytes_per_logit)))


def negatives_max(
    q: Tensor,
    bank: Tensor,
    tau: float,
    memory_mb: float = math.inf,
    logits_dtype: torch.dtype | None = None,
) -> Tensor:
    """The largest negative logit max_t q·r_t/τ per query (no gradient; for accuracy only).

    In chunks of the bank sized like `negatives_logsumexp`'s, with the same matmul precision.
    """
    accumulate = torch.promote_types(q.dtype, torch.float32)
    if logits_dtype is not None:
        q, bank = q.to(logits_dtype), bank.to(logits_dtype)
    chunk = logsumexp_chunk(len(q), len(bank), memory_mb, torch.finfo(accumulate).bits // 8)
    chunk = chunk or len(bank)
    maxima = [(q @ bank[s : s + chunk].T).amax(dim=1) for s in range(0, len(bank), chunk)]
    largest = maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(dim=0)
    return largest.to(accumulate) / tau


def accuracy_rows(n: int, kernel: str) -> slice:
    """The queries (of n) whose accuracy flags `info_nce` returns: all with the matmul kernel,
    an evenly spaced sample of at most `ACCURACY_SAMPLE` with the attention kernel."""
    return slice(None, None, 1 if kernel == "matmul" else max(1, math.ceil(n / ACCURACY_SAMPLE)))


def info_nce(
    q: Tensor,
    k_pos: Tensor,
    bank: Tensor,
    tau: float,
    memory_mb: float = math.inf,
    logits_dtype: torch.dtype | None = None,
    kernel: str = "matmul",
) -> tuple[Tensor, Tensor]:
    """Per-query InfoNCE loss (n,) and whether the positive ranks first among K+1 (bool).

    q, k_pos: (n, d) L2-normalised; bank: (K, d) L2-normalised, no gradient. `logits_dtype`
    and `kernel` choose how the negatives' log-sum-exp is computed (see the module docstring);
    the accuracy flags are those of the queries `accuracy_rows(len(q), kernel)`.
    """
    if kernel not in PATCH_LOSS_KERNELS:
        raise ValueError(f"kernel={kernel!r}: unknown (valid: {', '.join(PATCH_LOSS_KERNELS)})")
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 at least, float64 kept
    with torch.autocast(q.device.type, enabled=False):
        q, k_pos, bank = q.to(dtype), k_pos.to(dtype), bank.to(dtype)
        pos = (q * k_pos).sum(dim=1) / tau
        if kernel == "matmul":
            neg_lse, neg_max = negatives_logsumexp(q, bank, tau, memory_mb, logits_dtype)
            correct = pos.detach() > neg_max
        else:
            q_low, bank_low = q.to(logits_dtype or dtype), bank.to(logits_dtype or dtype)
            neg_lse = AttentionLogSumExp.apply(q_low, bank_low, tau, kernel == "cudnn_attention")
            sample = accuracy_rows(len(q), kernel)
            with torch.no_grad():  # the same matmul precision, from the same casts
                neg_max = negatives_max(q_low[sample].detach(), bank_low, tau, memory_mb)
            correct = pos.detach()[sample] > neg_max
        # log(exp(pos) + exp(neg_lse)) - pos, as one operator: its backward is one kernel
        # where logaddexp's and the subtraction's are nine.
        loss = torch.nn.functional.softplus(neg_lse.to(dtype) - pos)
    return loss, correct
