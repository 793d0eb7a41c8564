"""Two-view batches from Ray Data: decoding and augmentation in CPU tasks, not in GPU workers.

When to use it
    The DataLoader path (`dupr.data.two_views.build_loader`) decodes and augments inside each
    training worker's own processes, so a GPU node needs enough CPU cores per GPU for JPEG
    decoding and the MoCo v2 augmentation. Use this module when GPU nodes have few CPUs, or
    when CPU-only nodes should do the decoding: a Ray Data pipeline (``read_parquet`` →
    ``map_batches`` in Ray tasks) runs wherever the cluster has free CPUs and streams finished
    batches into the training workers through Ray Train's dataset shards. Keep the DataLoader
    path for single machines with enough cores, and whenever bitwise-reproducible runs are
    required (see below).

Tasks, not an actor pool
    Every epoch is a new execution of the pipeline (below), and Ray Data starts an actor pool's
    actors anew for every execution (ray-project/ray#46479): each decoding actor imported torch
    and built its transforms again, which on a 16-core GPU node took most of every 4,096-image
    epoch while the GPU waited (benchmarks/RESULTS.md, issue 14). A task's worker process
    outlives the task, and Ray reuses it for the next epoch's tasks, so only the first epoch
    starts decoding processes (`benchmarks/ray_data_passes.py` measures it pass by pass). What
    an actor held, the id index and the transforms, travels with the `DecodeTwoViews` object,
    which Ray Data puts in the object store once per pass and every task reads from there.

Resources
    Training workers keep their own ``resources_per_worker``; Ray Train reserves them and Ray
    Data schedules only in what is left. Leave room for the decoding tasks (at most
    ``concurrency`` at a time, ``num_cpus`` each) and for one whole CPU: in Ray 2.60 every pass
    starts with a ``ListFiles`` task that asks for 1 CPU regardless of ``read_num_cpus``
    (datasource V2); without it the pipeline waits forever ("Cluster resources are not enough
    to run any task from ...ReadFilesParquetV2").
    The read's blocks are split into blocks of ``block_rows`` images by a streaming
    repartition, whose tasks also take 1 CPU; with a single free CPU they take turns with the
    read tasks, which is enough (reading is cheap next to decoding).

How it splits the data
    ``TorchTrainer(datasets={"train": ds})`` with the default ``ray.train.DataConfig`` calls
    ``ds.streaming_split(world_size, equal=True)`` (ray/train/_internal/data_config.py in 2.60):
    every epoch re-executes the pipeline once for all workers, each row goes to exactly one
    worker, and every worker receives exactly ``total // world_size`` rows (Ray's OutputSplitter
    truncates the remainder). The map never drops a row (an undecodable image is replaced by a
    decodable neighbour and counted in ``skipped``), so each worker yields exactly
    ``(total // world) // batch_size`` batches per epoch — the same count on every rank, as
    Shuffle BN and DDP collectives require, and the count `EpochSampler` would give.

Randomness and reproducibility
    Row ``index`` is the image's global index in the shard set (the index `ParquetImageDataset`
    uses). Its views are drawn from a generator seeded by ``sample_seed(seed, pass, index)``,
    where ``pass`` is Ray Data's per-dataset execution counter (one execution per epoch), so
    every epoch gets new views, and pass ``p`` gives the very views the DataLoader path gives in
    epoch ``p``. What is *not* reproducible: which worker receives which image, the batch
    composition and the order (scheduling-dependent; files are shuffled per pass and rows are
    locally shuffled per worker), and after a restart the pass counter starts again at
    ``first_pass`` while training resumes at a later epoch; a resume in the middle of an epoch
    skips batches rather than particular images. The DataLoader path is bitwise reproducible
    across restarts; this path is not.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data import DataContext, FileShuffleConfig, TaskPoolStrategy

from dupr.config import AugmentConfig, ConfigError, DUPRConfig
from dupr.data.folder import ImageDecodeError, decode_pixels
from dupr.data.two_views import sample_seed, seeded
from dupr.views import TwoViews
from dupr_platform.shards import INDEX_NAME, ShardIndex, ShardIndexError
from dupr_platform.storage import Storage, StorageError, open_storage

__all__ = [
    "DecodeTwoViews",
    "IdIndex",
    "RayDataLoader",
    "RayShardSampler",
    "count_images",
    "two_view_dataset",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Image id → global index


def _hash_ids(ids: Iterable[str]) -> np.ndarray:
    """Stable 64-bit hashes of image ids (Python's ``hash`` differs between processes)."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
    )


class IdIndex:
    """Maps image ids to their global index in the shard set, in 16 bytes per image.

    Parquet rows carry no row number, so the index is recovered from the id: sorted id hashes
    and their positions, looked up with a binary search (no dict of strings in every decoding
    process).
    """

    def __init__(self, ids: Sequence[str]) -> None:
        hashes = _hash_ids(ids)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.positions = hashes[order], order.astype(np.int64)
        if len(self.hashes) > 1 and bool((self.hashes[1:] == self.hashes[:-1]).any()):
            raise ValueError("duplicate image ids (or a 64-bit hash collision) in the shard set")

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Global indices of ``ids``; an id not in the shard set is a ``KeyError``."""
        hashes = _hash_ids(ids)
        at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        found = self.hashes[at] == hashes
        if not bool(found.all()):
            missing = [i for i, ok in zip(ids, found, strict=True) if not ok]
            raise KeyError(f"image ids not in the shard index: {missing[:5]}")
        return self.positions[at]


def _read_ids(storage: Storage, index: ShardIndex, threads: int = 8) -> list[str]:
    """All image ids in global order (only the small ``id`` column is read)."""

    def read(path: str) -> list[str]:
        table = pq.read_table(storage.join(path), columns=["id"], filesystem=storage.filesystem)
        return table.column("id").to_pylist()

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(index.shards)))) as pool:
        parts = list(pool.map(read, [s.path for s in index.shards]))
    for shard, ids in zip(index.shards, parts, strict=True):
        if len(ids) != shard.rows:
            raise ShardIndexError(
                f"shard {storage.uri_for(shard.path)} has {len(ids)} rows, the index says "
                f"{shard.rows}; re-run prepare_shards"
            )
    return [i for ids in parts for i in ids]


# --------------------------------------------------------------------------------------------
# The map stage (runs in Ray Data tasks)


def _current_pass() -> int:
    """Ray Data's execution counter of this dataset: 0 in the first epoch, then 1, 2, ...

    Ray's own seeded ``random()`` expression and file shuffling read the same private field
    (ray/data/_internal/planner/plan_expression/synthetic_impl.py); 0 if it ever disappears.
    """
    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


class DecodeTwoViews:
    """``map_batches`` callable: encoded images → two augmented views with crop records.

    An object, not a function, so that the id index and the transforms are built once, on the
    driver, and every task gets them with the map (see "Tasks, not an actor pool"); each task
    runs its own copy over one block of rows. Undecodable images never fail the run and never
    drop a row (dropping would break the equal per-worker batch counts): the row takes the
    pixels of the next decodable image of the batch (or the last good image this copy saw)
    and ``skipped`` = 1, so the ``skipped`` column sums to the number of undecodable images.
    """

    def __init__(
        self,
        image_size: int,
        augment: dict[str, Any] | AugmentConfig,
        seed: int,
        ids: IdIndex,
        *,
        first_pass: int = 0,
        record_pid: bool = False,
    ) -> None:
        cfg = augment if isinstance(augment, AugmentConfig) else _augment_config(augment)
        self.transform = TwoViews(image_size, cfg)
        self.seed, self.ids, self.first_pass = seed, ids, first_pass
        self.record_pid = record_pid
        self._fallback: tuple[bytes, str] | None = None  # last decodable image of this copy

    def _decode_batch(self, ids: Sequence[str], images: Sequence[bytes]) -> tuple[list, list[int]]:
        """Decoded images, undecodable ones replaced; 1 marks a row whose own image failed."""
        decoded: list[Any] = []
        for name, data in zip(ids, images, strict=True):
            try:
                decoded.append(decode_pixels(data, name))
                self._fallback = (data, name)
            except ImageDecodeError as err:
                log.warning("skipping undecodable image: %s", err)
                decoded.append(None)
        n = len(decoded)
        out = []
        for row in range(n):
            img = next(
                (decoded[(row + k) % n] for k in range(n) if decoded[(row + k) % n] is not None),
                None,
            )
            if img is None:
                if self._fallback is None:
                    raise RuntimeError(
                        f"all {n} images of a batch failed to decode and no earlier image is "
                        f"available as a replacement (first id {ids[0]!r})"
                    )
                img = decode_pixels(*self._fallback)
            out.append(img)
        return out, [int(img is None) for img in decoded]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        index = self.ids.lookup(ids)
        images, skipped = self._decode_batch(ids, list(batch["image"]))
        pass_index = self.first_pass + _current_pass()
        samples = []
        for img, i in zip(images, index, strict=True):
            # Seeded locally, as in TwoViewDataset: (seed, pass, index) fixes the views.
            with seeded(sample_seed(self.seed, pass_index, int(i))):
                samples.append(self.transform(img))
        # One column per field of `TwoViews`' sample: float32 views (uint8 crops and float32
        # colour choices when the colour steps run on the device), float32 crop records.
        out = {key: np.stack([s[key].numpy() for s in samples]) for key in samples[0]}
        out["index"] = index.astype(np.int64)
        out["skipped"] = np.asarray(skipped, dtype=np.int64)
        if self.record_pid:
            out["pid"] = np.full(len(ids), os.getpid(), dtype=np.int64)
        return out


def _augment_config(augment: dict[str, Any]) -> AugmentConfig:
    """Plain dict (as in `DUPRConfig.to_dict()["augment"]`) → checked `AugmentConfig`."""
    return DUPRConfig.from_dict({"augment": dict(augment)}).augment


# --------------------------------------------------------------------------------------------
# The dataset (built on the driver)


def two_view_dataset(
    data_uri: str,
    image_size: int,
    augment: dict[str, Any],
    seed: int,
    *,
    concurrency: int = 8,
    num_cpus: float = 1.0,
    read_num_cpus: float = 1.0,
    map_batch_size: int = 16,
    block_rows: int = 64,
    shuffle_files: bool = True,
    first_pass: int = 0,
    record_pid: bool = False,
    endpoint_url: str | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of two-view rows from a Parquet shard set (local folder or s3:// prefix).

    The shard list comes from ``_index.json`` (a prefix without it is refused, as everywhere)
    and the files are read with the storage module's filesystem, so a custom S3 endpoint works.
    Decoding and augmentation run in CPU-only tasks, at most ``concurrency`` at a time, of
    ``num_cpus`` each; ``read_num_cpus`` per read task; a task takes a block of at most
    ``block_rows`` images.
    Pass the result to ``TorchTrainer(datasets={"train": ds})`` and iterate it in the workers
    with `RayDataLoader`.
    """
    if (
        min(image_size, concurrency, map_batch_size, block_rows) < 1
        or min(num_cpus, read_num_cpus) <= 0
    ):
        raise ConfigError(
            "image_size, concurrency, map_batch_size, block_rows, num_cpus, read_num_cpus must "
            "be positive"
        )
    storage, index = _open_shards(data_uri, endpoint_url)
    ids = IdIndex(_read_ids(storage, index))
    # The training's own progress line shows images/s; Ray Data's bars would reach the console
    # as raw tqdm JSON through the driver's output routing (dupr_platform.console).
    context = DataContext.get_current()
    context.enable_progress_bars = context.enable_operator_progress_bars = False
    ds = ray.data.read_parquet(
        [storage.join(s.path) for s in index.shards],
        filesystem=storage.filesystem,
        # A new file order every pass (seeded by seed and the pass), so batches mix shards.
        shuffle=FileShuffleConfig(seed=seed) if shuffle_files else None,
        num_cpus=read_num_cpus,
        file_extensions=["parquet"],
        partitioning=None,
    ).select_columns(["id", "image"])
    # A decoding task takes one block, and a read yields a few large ones (on Ray 2.60, 1,024
    # images in four shards came as one block, 4,096 in sixteen as three, and read_parquet's
    # override_num_blocks changed nothing): split them, streaming, so that every decoding
    # worker has work.
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    decode = DecodeTwoViews(
        image_size,
        _augment_config(augment),
        seed,
        ids,
        first_pass=first_pass,
        record_pid=record_pid,
    )
    return ds.map_batches(
        decode,
        batch_size=map_batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=0,
        udf_modifying_row_count=False,
    )


def count_images(data_uri: str, endpoint_url: str | None = None) -> int:
    """Number of images in a shard set (what `RayDataLoader` needs as ``num_images``)."""
    return _open_shards(data_uri, endpoint_url)[1].total


def _open_shards(data_uri: str, endpoint_url: str | None) -> tuple[Storage, ShardIndex]:
    """Storage and index of a shard set; never creates a missing local folder."""
    local = "://" not in data_uri or data_uri.startswith("file://")
    path = data_uri.removeprefix("file://")
    if local and not os.path.isdir(os.path.expanduser(path)):
        raise ShardIndexError(f"no shard index {os.path.join(path, INDEX_NAME)}: no folder")
    try:
        storage = open_storage(data_uri, endpoint_url=endpoint_url)
    except StorageError as exc:
        raise ShardIndexError(f"shard set: {exc}") from None
    return storage, ShardIndex.load(storage)


# --------------------------------------------------------------------------------------------
# The training-worker side


class RayShardSampler:
    """The sampler interface `dupr.train.train()` uses, for a Ray Train dataset shard.

    Ray decides which rows each worker gets; this only carries the epoch and the resume point,
    and the per-worker sample count (``num_images // world_size``, as streaming_split with
    ``equal=True`` delivers, and as `EpochSampler` computes).
    """

    def __init__(self, num_images: int, num_replicas: int) -> None:
        if num_images < 1 or num_replicas < 1:
            raise ValueError("num_images and num_replicas must be >= 1")
        self.num_images, self.num_replicas = num_images, num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def samples_per_replica(self) -> int:
        return self.num_images // self.num_replicas

    def __len__(self) -> int:
        return self.samples_per_replica() - self.start


class RayDataLoader:
    """What `dupr.train.train()` needs from a DataLoader, fed by ``get_dataset_shard``.

    Iterating yields dict batches of host tensors (``view1, view2, crop1, crop2, index,
    skipped``, and ``photometric1, photometric2`` when the colour steps run on the device),
    locally shuffled over ``shuffle_batches`` batches' worth of rows, exactly
    ``samples_per_replica // batch_size`` per epoch minus the batches before ``sampler.start``
    (a mid-epoch resume consumes and discards them). A shard that delivers a different number
    of batches is an error, not a silently shifted schedule.

    The batches stay on the host, as a torch DataLoader's do, and `dupr.train.to_device` moves
    what the model needs. Ray's ``device="auto"`` would move every column to the GPU, and then
    the training loop's reads of ``skipped`` and of the colour choices would each wait for the
    GPU to finish the previous step, leaving it idle while the next one is launched. With
    ``pin_memory`` (on a CUDA worker) Ray's collate thread pins the batch, so the copy to the
    GPU does not block the host.
    """

    drop_last = True  # the only mode: every rank must run the same number of steps

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        num_images: int,
        world_size: int,
        *,
        prefetch_batches: int = 2,
        shuffle_batches: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.shard, self.batch_size = shard, batch_size
        self.sampler = RayShardSampler(num_images, world_size)
        if self.sampler.samples_per_replica() < batch_size:
            raise ConfigError(
                f"batch_size={batch_size}: larger than the {self.sampler.samples_per_replica()} "
                f"images per worker ({num_images} images over {world_size} workers)"
            )
        if shuffle_batches < 0 or prefetch_batches < 0:
            raise ConfigError("shuffle_batches and prefetch_batches must be >= 0")
        self.prefetch_batches = prefetch_batches
        # Rows arrive in runs of consecutive images of one file (often one class): a local
        # shuffle over a few batches' worth of rows mixes them. 0 turns it off.
        self.shuffle_buffer = shuffle_batches * batch_size or None
        self.pin_memory = pin_memory

    @classmethod
    def for_worker(
        cls, name: str, batch_size: int, num_images: int, **kwargs: Any
    ) -> RayDataLoader:
        """Inside a Ray Train worker: this worker's shard of the trainer dataset ``name``."""
        import ray.train

        world = ray.train.get_context().get_world_size()
        return cls(ray.train.get_dataset_shard(name), batch_size, num_images, world, **kwargs)

    def steps_per_epoch(self) -> int:
        return self.sampler.samples_per_replica() // self.batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        expected = self.steps_per_epoch()
        skip = self.sampler.start // self.batch_size
        seen = 0
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=True,
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer,
            device="cpu",
            pin_memory=self.pin_memory,
        )
        for batch in batches:
            seen += 1
            if seen > expected:
                break
            if seen > skip:
                yield batch
        if seen != expected:
            raise RuntimeError(
                f"the Ray dataset shard gave {seen} batches in epoch {self.sampler.epoch}, "
                f"expected {expected} ({self.sampler.num_images} images over "
                f"{self.sampler.num_replicas} workers, batch {self.batch_size}): was the "
                "dataset built from a different shard set, or split with equal=False?"
            )
