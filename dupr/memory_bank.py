"""The memory bank of Eq. 7–8: a FIFO queue of K L2-normalised keys from the momentum encoder.

Unlike MoCo's queue, enqueue wraps around, so K need not be a multiple of the number of keys
added per step (DUPR adds 32 patch keys per step, and the global batch varies with the number
of workers). The keys and the write pointer are persistent buffers: they travel with the
model's state_dict, so a resumed run continues with the same negatives.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class MemoryBank(nn.Module):
    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        # Random unit vectors until real keys replace them, as MoCo initialises its queue.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, new_keys: Tensor, flags: Tensor | None = None) -> None:
        """Replace the oldest keys with `new_keys` (n, dim), wrapping around the end of the bank.

        `flags` (n,) bool, valid keys first, marks the keys to add; the rest are padding. The
        count stays on the device: writes of padding rows keep the bank's keys, and the pointer
        moves by the count, so the host never waits for the GPU here.
        """
        n = len(new_keys)
        if n == 0:
            return
        if n > self.size:  # only the newest K keys can stay (rare: K below the keys per step)
            if flags is not None:  # the flagged keys only (a host sync, in this rare case)
                new_keys, n = new_keys[flags], int(flags.sum())
                flags = None
            new_keys = new_keys[-self.size :]
            self.ptr.add_(max(n - self.size, 0)).remainder_(self.size)
            n = len(new_keys)
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        new_keys = F.normalize(new_keys.to(self.keys.dtype), dim=1)
        if flags is None:
            self.keys[idx] = new_keys
            self.ptr.add_(n).remainder_(self.size)
        else:
            self.keys[idx] = torch.where(flags[:, None], new_keys, self.keys[idx])
            self.ptr.add_(flags.sum()).remainder_(self.size)
