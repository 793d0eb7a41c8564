"""The few collective operations the model needs, each a no-op without torch.distributed.

Everything here runs without gradients: MoCo's key path is not differentiated, and
`dist.all_gather` has no autograd. All ranks must pass tensors of the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather(t: Tensor) -> Tensor:
    """Concatenate `t` from all ranks along dim 0 (rank order)."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_reduce_sum(t: Tensor) -> Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


@torch.no_grad()
def shuffle_batch(*tensors: Tensor) -> tuple[list[Tensor], Tensor]:
    """Shuffle BN's batch shuffle: each rank receives a random slice of the global batch.

    The same permutation (rank 0's, broadcast) is applied to every tensor, so images stay with
    their crop records. Returns the local shuffled tensors and the index that undoes it.
    """
    gathered = [all_gather(t) for t in tensors]
    n_all, n_local = len(gathered[0]), len(tensors[0])
    perm = torch.randperm(n_all, device=gathered[0].device)
    dist.broadcast(perm, src=0)
    mine = perm.view(-1, n_local)[rank()]
    return [g[mine] for g in gathered], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(t: Tensor, unshuffle: Tensor) -> Tensor:
    """Inverse of `shuffle_batch` for an output computed on the shuffled slice."""
    n_local = len(t)
    return all_gather(t)[unshuffle.view(-1, n_local)[rank()]]
