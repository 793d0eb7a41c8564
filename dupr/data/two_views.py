"""Pairs of views with crop records, reproducible per (seed, epoch, image) and resumable mid-epoch.

Each sample's augmentation is drawn from a generator seeded by (seed, epoch, index), so the
views do not depend on the number of loader processes, on the number of training workers, or
on where a resumed run restarts. `EpochSampler` gives every epoch its own permutation, splits
it over ranks like DistributedSampler, and can start part-way through an epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from dupr.config import ConfigError
from dupr.data.folder import ImageDecodeError

log = logging.getLogger(__name__)


class UndecodableDataError(RuntimeError):
    """So many images in a row fail to decode that the data, not one file, is broken."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (SplitMix64-style mixing of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with ``seed`` inside, and as it was again after.

    The augmentations draw from that generator (torchvision's transforms take none of their
    own). Only the CPU generator: ``torch.manual_seed`` would reseed every CUDA device's
    generator too (the training process's, when the loader runs in it), and before CUDA starts
    it records a stack trace for that on every call (0.13 ms; one sample's decoding and crops
    take about 3.5 ms).
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


class TwoViewDataset(Dataset):
    """Wraps an image dataset (with a `load(i) -> PIL image`, or `load_pixels(i)`) into two-view
    training samples.

    Items are dicts: the transform's (`dupr.views.TwoViews`: ``view1, view2``, ``crop1, crop2``
    (5,) crop records, and ``photometric1, photometric2`` when the colour steps run on the
    device), ``index``, and ``skipped``: how many undecodable files were passed over to produce
    this sample. A file that fails to decode is logged and replaced by the next one, never fatal.
    """

    max_skips = 16

    def __init__(self, images: Any, transform: Callable, seed: int = 0) -> None:
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        last_error: ImageDecodeError | None = None
        # Pixels straight from the decoder where the dataset offers them (`load_pixels`, a
        # (3, H, W) uint8 tensor); the transform takes those or a PIL image.
        load = getattr(self.images, "load_pixels", self.images.load)
        for skipped in range(self.max_skips + 1):
            i = (index + skipped) % len(self.images)
            try:
                img = load(i)
                break
            except ImageDecodeError as err:
                log.warning("skipping undecodable image: %s", err)
                last_error = err
        else:
            raise UndecodableDataError(
                f"{self.max_skips + 1} consecutive images failed to decode at index {index} "
                f"(last: {last_error})"
            )
        # Seeded locally: the global torch generators of the calling process are left untouched.
        with seeded(sample_seed(self.seed, epoch, index)):
            sample = self.transform(img)
        return {**sample, "index": index, "skipped": skipped}


class EpochSampler(Sampler):
    """Per-epoch permutation split over ranks; yields (epoch, index) so workers need no state.

    Like DistributedSampler with drop_last=True, every rank gets the same number of samples
    (Shuffle BN needs equal per-rank batches). `start` skips the first samples of this rank's
    share, to resume in the middle of an epoch.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: must be in [0, {num_replicas})")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> Sequence[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.length - self.length % self.num_replicas
        return order[self.rank : total : self.num_replicas]

    def samples_per_replica(self) -> int:
        """Samples of one rank in a whole epoch (the same for every rank)."""
        return self.length // self.num_replicas

    def __len__(self) -> int:
        return self.samples_per_replica() - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices()[self.start :]:
            yield self.epoch, index


def check_epoch_size(num_images: int, batch_size: int, num_replicas: int = 1) -> None:
    """Every rank gets at least one whole batch per epoch (`batch_size` is per rank), else a
    ConfigError: with drop_last an epoch would have no step at all."""
    per_replica = num_images // num_replicas
    if per_replica < batch_size:
        raise ConfigError(
            f"batch_size={batch_size}: larger than the {per_replica} images per "
            f"worker ({num_images} images over {num_replicas} workers)"
        )


def build_loader(
    images: Any,
    transform: Callable,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of two-view batches for one rank (`batch_size` is per rank)."""
    dataset = TwoViewDataset(images, transform, seed=seed)
    sampler = EpochSampler(len(dataset), seed=seed, num_replicas=num_replicas, rank=rank)
    check_epoch_size(len(dataset), batch_size, num_replicas)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Its own generator: starting an epoch must not draw from the global one, or a run
        # resumed mid-epoch would see different random numbers than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
