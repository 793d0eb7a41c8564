"""DUPR: multi-level MoCo v2 with patch re-identification (paper §3.2, Fig. 3).

One query encoder (backbone f₁ with heads h₁, g₁) learns by gradient; its momentum twin (f₂, h₂,
g₂) encodes the keys. For every level m with α_m > 0 there is an image-level InfoNCE (Eq. 8),
for every level with β_m > 0 a patch-level InfoNCE over the S×S cells of the views'
intersection (Eq. 7), each with its own memory bank; Eq. 2 adds them up. MoCo v2 is the special
case α = (0, 0, 0, 1), β = 0.
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
import torch.nn as nn
from torch import Tensor

from dupr import distributed as D
from dupr.backbone import ResNetBackbone
from dupr.config import LEVELS, STRIDES, ModelConfig
from dupr.geometry import shortest_side, view_boxes
from dupr.heads import ImageHead, PatchHead, normalize_rows
from dupr.losses import accuracy_rows, info_nce
from dupr.memory_bank import MemoryBank
from dupr.sync_batchnorm import SyncBatchNorm


class Encoder(nn.Module):
    """Backbone plus the heads of the levels whose loss weight is non-zero.

    Heads of zero-weight levels are not built: they would get no gradient, which DDP rejects.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = SyncBatchNorm if cfg.bn_mode == "sync" else None
        self.backbone = ResNetBackbone(cfg.backbone, norm_layer=norm)
        channels = self.backbone.channels
        self.up_to = cfg.deepest_level()
        self.image_heads = nn.ModuleDict(
            {
                LEVELS[m]: ImageHead(channels[m], cfg.hidden_dim or channels[m], cfg.embed_dim)
                for m in cfg.image_levels()
            }
        )
        self.patch_heads = nn.ModuleDict(
            {
                LEVELS[m]: PatchHead(
                    channels[m],
                    cfg.hidden_dim or channels[m],
                    cfg.embed_dim,
                    roi_size=cfg.roi_size[m],
                    stride=STRIDES[m],
                    aligned=cfg.roi_aligned,
                    sampling_ratio=cfg.roi_sampling_ratio,
                    kernel=cfg.roi_align_kernel,
                )
                for m in cfg.patch_levels()
            }
        )

    def forward(
        self, images: Tensor, boxes: Tensor, crops: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Image embeddings v (N, d) and patch embeddings r (N, d, S, S) per level name, each
        L2-normalised over d."""
        feats = self.backbone(images, self.up_to)
        image = {name: head(feats[LEVELS.index(name)]) for name, head in self.image_heads.items()}
        patch = {
            name: head(feats[LEVELS.index(name)], boxes, crops).permute(0, 2, 3, 1)
            for name, head in self.patch_heads.items()
        }  # as (N, S, S, d): cell-major, the rows a view
        unit = iter(normalize_rows(*image.values(), *patch.values()))
        return (
            {name: next(unit) for name in image},
            {name: next(unit).permute(0, 3, 1, 2) for name in patch},
        )


class DUPR(nn.Module):
    # Eq. 7–8's InfoNCE; an attribute so that `dupr.train.compile_model` can put its compiled
    # form in its place.
    info_nce = staticmethod(info_nce)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_q = Encoder(cfg)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        # One memory bank per loss term (§3.2.3).
        self.banks = nn.ModuleDict(
            {
                f"image_{LEVELS[m]}": MemoryBank(cfg.queue_size, cfg.embed_dim)
                for m in cfg.image_levels()
            }
            | {
                f"patch_{LEVELS[m]}": MemoryBank(cfg.queue_size, cfg.embed_dim)
                for m in cfg.patch_levels()
            }
        )

    def forward(
        self, im_q: Tensor, im_k: Tensor, crop_q: Tensor, crop_k: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (Eq. 2) for a batch of view pairs, and detached metrics.

        im_q, im_k: (N, 3, P, P) views; crop_q, crop_k: (N, 5) crop records (see dupr.geometry).
        """
        cfg = self.cfg
        box_q, box_k, overlap = view_boxes(crop_q, crop_k, im_q.shape[-1])  # B1, B2 (Eq. 3–4)
        image_q, patch_q = self.encoder_q(im_q, box_q, crop_q)
        with torch.no_grad():
            self.momentum_update()
            image_k, patch_k = self.keys(im_k, box_k, crop_k)

        total = im_q.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Tensor] = {"overlap": overlap.mean(dtype=torch.float32)}
        for name, q in image_q.items():
            weight = cfg.alpha[LEVELS.index(name)]
            loss, correct = self.info_nce(
                q, image_k[name], self.bank_snapshot(f"image_{name}"), cfg.tau
            )
            loss = loss.mean()  # Eq. 8, averaged over the images of the batch
            total = total + weight * loss
            metrics[f"loss/image_{name}"] = loss.detach()
            metrics[f"acc/image_{name}"] = correct.mean(dtype=torch.float32)
        # A pair counts at a level where B spans at least one of its cells in both views.
        side = shortest_side(box_q, box_k)
        valid = {
            name: overlap & (side >= stride)
            for name, stride in zip(LEVELS, STRIDES, strict=True)
            if name in patch_q
        }
        # Patch losses are averaged over the valid cells of the GLOBAL batch (see patch_loss);
        # one all-reduce carries every level's count.
        counts = torch.stack([v.sum() for v in valid.values()]) if valid else overlap.new_zeros(0)
        n_valid = dict(zip(valid, D.all_reduce_sum(counts) if valid else counts, strict=True))
        for name, r_q in patch_q.items():
            weight = cfg.beta[LEVELS.index(name)]
            loss, acc = self.patch_loss(name, r_q, patch_k[name], valid[name], n_valid[name])
            total = total + weight * loss
            metrics[f"loss/patch_{name}"] = loss.detach()
            metrics[f"acc/patch_{name}"] = acc
            metrics[f"valid/patch_{name}"] = valid[name].mean(dtype=torch.float32)
        metrics["loss"] = total.detach()

        self.enqueue(image_k, patch_k, valid)  # after the loss: a key is never its own negative
        return total, metrics

    def patch_loss(
        self, name: str, r_q: Tensor, r_k: Tensor, valid: Tensor, n_valid_global: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Eq. 7 for one level, normalised as a mean over valid cells and images.

        The paper writes Eq. 7 as a sum over the S×S positions p; we divide by the number of
        positions and images so that β_m = 1 weighs a level like α_m = 1 does for the mean of
        Eq. 8. Pairs that are not `valid` at this level (crops that do not overlap, or overlap
        by less than one cell: `dupr.geometry.shortest_side`) contribute nothing (and where none
        is valid, the loss is a zero still connected to the patch head, so every parameter gets
        a gradient and DDP's reducer is satisfied). Under DDP each
        rank divides by the global count / world size, so that DDP's gradient average equals
        the mean over the global batch whatever the per-rank counts are.
        """
        cells = r_q.shape[-1] * r_q.shape[-2]
        # Every cell of every pair goes through the loss and the invalid ones are weighted out:
        # selecting the valid rows would make the host wait for the GPU to count them, and
        # nearly all pairs are valid (99 % of RandomResizedCrop pairs at 224 px).
        q = r_q.flatten(2).transpose(1, 2).flatten(0, 1)  # (N·S², d), cell-major per image
        k = r_k.flatten(2).transpose(1, 2).flatten(0, 1)
        counts = valid.repeat_interleave(cells)
        denom = (n_valid_global * cells).clamp(min=1) / D.world_size()  # a float
        losses, correct = self.info_nce(
            q,
            k,
            self.bank_snapshot(f"patch_{name}"),
            self.cfg.tau,
            self.cfg.loss_memory_mb,
            logits_dtype=torch.bfloat16 if self.cfg.patch_logits == "bfloat16" else None,
            kernel=self.cfg.patch_loss_kernel,
        )
        # torch.where, not a product: a zero weight would still pass on a non-finite loss.
        loss = torch.where(counts, losses, 0.0).sum() / denom
        counted = counts[accuracy_rows(len(q), self.cfg.patch_loss_kernel)]
        acc = (correct & counted).sum() / counted.sum()  # NaN where nothing overlaps
        return loss, acc

    def bank_snapshot(self, name: str) -> Tensor:
        """The bank's keys as they are now; backward needs them after `enqueue` changed the bank."""
        return self.bank(name).keys.clone()

    def bank(self, name: str) -> MemoryBank:
        """The memory bank of one loss term (`nn.ModuleDict` types its items as plain modules)."""
        return cast(MemoryBank, self.banks[name])

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over parameters (BN running statistics are not averaged)."""
        k_params: list[Tensor] = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.cfg.momentum)

    @torch.no_grad()
    def keys(
        self, im_k: Tensor, box_k: Tensor, crop_k: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Key embeddings from the momentum encoder, with Shuffle BN under DDP.

        The crop records and boxes travel with their images through the shuffle, so RoIAlign
        and the BN-free patch heads run on the shuffled slice and only the small embeddings are
        gathered back, not the feature maps.
        """
        if self.cfg.bn_mode != "shuffle" or not D.is_distributed():
            return self.encoder_k(im_k, box_k, crop_k)
        (im, box, crop), unshuffle = D.shuffle_batch(im_k, box_k, crop_k)
        image, patch = self.encoder_k(im, box, crop)
        return (
            {n: D.unshuffle_batch(v, unshuffle) for n, v in image.items()},
            {n: D.unshuffle_batch(r, unshuffle) for n, r in patch.items()},
        )

    @torch.no_grad()
    def enqueue(
        self, image_k: dict[str, Tensor], patch_k: dict[str, Tensor], valid: dict[str, Tensor]
    ) -> None:
        """Image banks take every key of the global batch; patch banks a random valid sample."""
        for name, k in image_k.items():
            self.bank(f"image_{name}").enqueue(D.all_gather(k.float()))
        for name, r in patch_k.items():
            self.bank(f"patch_{name}").enqueue(*self.sample_patch_keys(r, valid[name]))

    @torch.no_grad()
    def sample_patch_keys(self, r_k: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """`patch_keys_per_enqueue` random valid patch keys of the GLOBAL batch (paper: 32).

        The paper samples 32 patch keys per batch of 256 images, which in MoCo's recipe is the
        global batch over 8 GPUs; taking 32 for the global batch keeps the bank's age (K / 32 steps)
        independent of the number of workers. Each rank draws ceil(32 / world) of its valid
        keys, the gathered draws are ordered valid first, and the first 32 are kept; every
        rank therefore enqueues the same keys. Returns the keys with a flag per key (False:
        padding, where fewer cells are valid), so that no shape depends on how many are valid
        and the host never waits for the GPU to count them.
        """
        want = self.cfg.patch_keys_per_enqueue
        n_local = math.ceil(want / D.world_size())
        cells = r_k.shape[-1] * r_k.shape[-2]
        keys = r_k.flatten(2).transpose(1, 2).flatten(0, 1)  # (N·S², d), a view
        # A uniformly random subset of the valid cells: the top random scores, in descending
        # order, so valid ones first (invalid cells score -1).
        scores = torch.rand(len(keys), device=keys.device)
        scores.masked_fill_(~valid.repeat_interleave(cells), -1.0)
        drawn = min(n_local, len(keys))
        top_scores, top = scores.topk(drawn)
        sample, flags = keys[top].float(), top_scores >= 0
        if drawn < n_local:  # fewer cells in the batch than keys to draw: pad with invalid rows
            sample = torch.cat([sample, sample.new_zeros(n_local - drawn, sample.shape[1])])
            flags = torch.cat([flags, flags.new_zeros(n_local - drawn)])
        if D.world_size() == 1:
            return sample, flags
        # gloo gathers no bool; each rank's valid keys come first, so sort the gathered flags.
        sample, gathered = D.all_gather(sample), D.all_gather(flags.to(torch.uint8))
        first = torch.sort(gathered, descending=True, stable=True).indices[:want]
        return sample[first], gathered[first].bool()
