"""Synchronised BatchNorm that works on any process group, GPU (NCCL) or CPU (gloo).

`torch.nn.SyncBatchNorm` refuses CPU tensors, and DDP refuses it on CPU modules. This one is a
plain BatchNorm2d whose training statistics come from the global batch: per-channel sums, sums
of squares and counts are added up over ranks with the autograd-aware
`torch.distributed.nn.functional.all_reduce`, whose backward all-reduces the gradients as
SyncBN's backward must. We deviate from the library class so that `bn_mode="sync"` runs on CPU
clusters and so that tests can check that N workers × batch b compute what 1 worker × N·b does;
on GPUs it costs two extra reductions per layer over PyTorch's fused kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
from torch import Tensor


class SyncBatchNorm(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        syncing = self.training and dist.is_available() and dist.is_initialized()
        if not syncing or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        # new_full, not new_tensor: a tensor made from a host value is a blocking copy to a GPU.
        count = x.new_full((1,), x.numel() / x.shape[1])
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = dist_fn.all_reduce(stats)  # sums over ranks; backward sums the gradients
        c = x.shape[1]
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp(min=0)
        if self.track_running_stats:
            # BatchNorm registers these buffers (not None) whenever track_running_stats is on.
            tracked, running_mean, running_var = (
                self.num_batches_tracked,
                self.running_mean,
                self.running_var,
            )
            assert tracked is not None and running_mean is not None and running_var is not None
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.lerp_(mean.detach(), m)
                running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
