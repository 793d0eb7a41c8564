"""Two-view batches from Ray Data: the map stage alone, the loader adapter, and a real TorchTrainer."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train.torch import TorchTrainer

from dupr.config import AugmentConfig, ConfigError, OptimConfig
from dupr.data import build_bundled_image_folder
from dupr.data.two_views import TwoViewDataset, sample_seed
from dupr.train import build_state, to_device, train
from dupr.views import TwoViews
from dupr_platform.ray_data import (
    DecodeTwoViews,
    IdIndex,
    RayDataLoader,
    count_images,
    two_view_dataset,
)
from dupr_platform.shards import ParquetImageDataset, ShardIndexError, prepare_shards
from services import make_bucket

# The train function below is defined here, not in an installed package: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZE = 32  # view side in pixels: small, so the test is about data flow, not augmentation cost
NUM_IMAGES = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ray-data")
    images = build_bundled_image_folder(root / "images", num_images=NUM_IMAGES)
    dest = root / "shards"
    prepare_shards(str(images), str(dest), images_per_shard=10, row_group_size=4)
    return str(dest)


def _rows(shards: str) -> tuple[list[str], list[bytes]]:
    """Ids and encoded bytes of every image, in global (shard) order."""
    ids, images = [], []
    for name in sorted(f for f in os.listdir(shards) if f.endswith(".parquet")):
        table = pq.read_table(os.path.join(shards, name), columns=["id", "image"])
        ids += table.column("id").to_pylist()
        images += table.column("image").to_pylist()
    return ids, images


# --------------------------------------------------------------------------------------------
# The map stage without Ray


def test_map_gives_the_dataloader_views_and_replaces_undecodable_images(shards):
    ids, images = _rows(shards)
    rows = [5, 17, 2, 11]
    batch = {
        "id": np.array([ids[r] for r in rows], dtype=object),
        "image": np.array([images[r] for r in rows], dtype=object),
    }
    batch["image"][1] = b"this is not an image"
    decode = DecodeTwoViews(SIZE, {"preset": "mocov2"}, 7, IdIndex(ids), record_pid=True)
    out = decode(batch)

    assert out["view1"].shape == out["view2"].shape == (4, 3, SIZE, SIZE)
    assert out["view1"].dtype == np.float32 and out["crop1"].dtype == np.float32
    assert out["crop1"].shape == out["crop2"].shape == (4, 5)
    assert out["index"].tolist() == rows and out["index"].dtype == np.int64
    assert out["skipped"].tolist() == [0, 1, 0, 0]  # sums to the number of undecodable images
    assert set(out["pid"].tolist()) == {os.getpid()}
    assert np.isfinite(out["view1"]).all()

    # Pass 0 of this path gives exactly the views of epoch 0 of the DataLoader path.
    reference = TwoViewDataset(ParquetImageDataset(shards), TwoViews(SIZE, AugmentConfig()), 7)
    for k in (0, 2, 3):
        item = reference[(0, rows[k])]
        for key in ("view1", "view2", "crop1", "crop2"):
            np.testing.assert_array_equal(out[key][k], item[key].numpy())
    # The undecodable row keeps its index and seed but takes its neighbour's pixels (rows[2]).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(7, 0, rows[1]))
        pair = TwoViews(SIZE, AugmentConfig())(reference.images.load(rows[2]))
    np.testing.assert_array_equal(out["view1"][1], pair["view1"].numpy())
    np.testing.assert_array_equal(out["crop1"][1], pair["crop1"].numpy())


def test_map_leaves_the_colour_steps_to_the_device_when_asked(shards):
    ids, images = _rows(shards)
    rows = [3, 8]
    batch = {
        "id": np.array([ids[r] for r in rows], dtype=object),
        "image": np.array([images[r] for r in rows], dtype=object),
    }
    augment = {"preset": "mocov2_randaugment", "photometric_on": "device"}
    out = DecodeTwoViews(SIZE, augment, 7, IdIndex(ids))(batch)
    assert out["view1"].dtype == np.uint8 and out["view1"].shape == (2, 3, SIZE, SIZE)
    assert out["photometric2"].dtype == np.float32 and out["photometric2"].shape[0] == 2
    cfg = AugmentConfig(**augment)
    reference = TwoViewDataset(ParquetImageDataset(shards), TwoViews(SIZE, cfg), 7)
    for k, r in enumerate(rows):
        for key, value in reference[(0, r)].items():
            if key not in ("index", "skipped"):
                np.testing.assert_array_equal(out[key][k], value.numpy())


def test_map_without_any_decodable_image(shards):
    ids, images = _rows(shards)
    decode = DecodeTwoViews(SIZE, {}, 0, IdIndex(ids))
    broken = {"id": np.array(ids[:2], dtype=object), "image": np.array([b"x", b"y"], dtype=object)}
    with pytest.raises(RuntimeError, match="failed to decode"):
        decode(broken)
    decode({"id": np.array(ids[2:3], dtype=object), "image": np.array(images[2:3], dtype=object)})
    out = decode(broken)  # now the last good image of this copy stands in
    assert out["skipped"].tolist() == [1, 1] and out["index"].tolist() == [0, 1]


def test_id_index():
    index = IdIndex(["a/1.jpg", "b/2.jpg", "a/0.jpg"])
    assert index.lookup(["a/0.jpg", "a/1.jpg", "b/2.jpg"]).tolist() == [2, 0, 1]
    with pytest.raises(KeyError, match="c.jpg"):
        index.lookup(["c.jpg"])
    with pytest.raises(ValueError, match="duplicate"):
        IdIndex(["x", "x"])


def test_a_prefix_without_index_is_refused(tmp_path):
    with pytest.raises(ShardIndexError, match="no shard index"):
        count_images(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ShardIndexError, match="no shard index"):
        two_view_dataset(str(tmp_path), SIZE, {}, seed=0)


class FakeShard:
    """Stands in for a Ray DataIterator: a fixed list of batches per epoch."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def iter_torch_batches(self, **kwargs):
        assert kwargs["drop_last"] is True and kwargs["local_shuffle_buffer_size"] == 8
        # Host batches: the loop's reads of `skipped` must not wait for the GPU.
        assert kwargs["device"] == "cpu" and kwargs["pin_memory"] is False
        return ({"index": torch.tensor([i])} for i in range(self.batches))


def test_loader_adapter_counts_and_resumes():
    loader = RayDataLoader(FakeShard(3), batch_size=4, num_images=25, world_size=2)
    assert (loader.drop_last, loader.sampler.samples_per_replica(), len(loader)) == (True, 12, 3)
    assert [int(b["index"]) for b in loader] == [0, 1, 2]
    loader.sampler.set_epoch(1, start=8)  # resumed after two of the three steps
    assert len(loader) == 1 and [int(b["index"]) for b in loader] == [2]
    short = RayDataLoader(FakeShard(2), batch_size=4, num_images=24, world_size=2)
    with pytest.raises(RuntimeError, match="gave 2 batches"):
        list(short)
    with pytest.raises(ConfigError, match="batch_size=16"):
        RayDataLoader(FakeShard(0), batch_size=16, num_images=24, world_size=2)


# --------------------------------------------------------------------------------------------
# Real local Ray: the pipeline feeds two TorchTrainer workers running dupr.train.train()


class ProbeModel(torch.nn.Module):
    """DUPR's call signature with a trivial loss: the test is about the data, not the model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, im_q, im_k, crop_q, crop_k):
        loss = (self.w - im_q.mean()) ** 2 + 0.0 * im_k.mean()
        return loss, {"loss": loss.detach()}


def seconds_since_boot(pid: int | None = None) -> float | None:
    """Now (no pid), or when process `pid` started (None if it is gone), on Linux's boot clock."""
    if pid is None:
        return float(Path("/proc/uptime").read_text().split()[0])
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    # Field 22, start time in clock ticks; the fields after the command's closing parenthesis.
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


class Recorder:
    """Passes a loader through to train() unchanged and notes what every batch held."""

    def __init__(self, loader: RayDataLoader) -> None:
        self.loader, self.batch_size, self.drop_last = loader, loader.batch_size, loader.drop_last
        self.sampler = loader.sampler
        self.epochs: list[list[dict]] = []
        self.epoch_starts: list[float | None] = []

    def __iter__(self):
        self.epochs.append([])
        self.epoch_starts.append(seconds_since_boot())
        for batch in self.loader:
            self.epochs[-1].append(
                {
                    "keys": sorted(batch),
                    "shapes": {k: list(v.shape) for k, v in batch.items()},
                    "dtypes": {k: str(v.dtype) for k, v in batch.items()},
                    "index": batch["index"].tolist(),
                    "crop1": batch["crop1"].tolist(),
                    "crop2": batch["crop2"].tolist(),
                    "view_sums": batch["view1"].sum(dim=(1, 2, 3)).tolist(),
                    "skipped": batch["skipped"].tolist(),
                    "pid": batch["pid"].tolist(),
                    "started": {p: seconds_since_boot(p) for p in set(batch["pid"].tolist())},
                }
            )
            yield batch


def train_fn(config: dict) -> None:
    ctx = ray.train.get_context()
    loader = Recorder(RayDataLoader.for_worker("train", config["batch_size"], config["num_images"]))
    optim = OptimConfig(lr=0.01, batch_size=config["batch_size"] * 2, epochs=2, amp=False)
    state = build_state(ProbeModel(), optim, len(loader.loader), torch.device("cpu"))
    train(state, loader, optim, torch.device("cpu"), log_every=100)
    record = {
        "pid": os.getpid(),
        "steps": state.step,
        "epochs": loader.epochs,
        "epoch_starts": loader.epoch_starts,
    }
    path = os.path.join(config["out"], f"rank{ctx.get_world_rank()}.json")
    with open(path, "w") as f:
        json.dump(record, f)


def test_two_workers_see_every_image_once_per_epoch(local_ray, shards, tmp_path):
    assert count_images(shards) == NUM_IMAGES
    ds = two_view_dataset(
        shards,
        SIZE,
        {"preset": "mocov2"},
        seed=3,
        concurrency=1,
        num_cpus=0.5,
        read_num_cpus=0.25,
        map_batch_size=4,
        record_pid=True,
    )
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"out": str(out), "batch_size": 4, "num_images": NUM_IMAGES},
        # 2 × 0.25 CPU for training + 0.5 for the decoding task leave 1 CPU, which Ray Data's
        # ListFiles task needs at the start of every pass (it takes a whole CPU whatever
        # read_num_cpus says): with 0.5 CPU per training worker this deadlocks.
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=ray.train.RunConfig(
            name="ray-data-test",
            storage_path=str(tmp_path / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    )
    result = trainer.fit()
    assert result.error is None

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    train_pids = {r["pid"] for r in ranks}
    assert [r["steps"] for r in ranks] == [6, 6]  # train() ran 2 epochs × 3 steps on each rank
    views: list[dict[int, float]] = []
    for epoch in range(2):
        batches = [b for r in ranks for b in r["epochs"][epoch]]
        assert [len(r["epochs"][epoch]) for r in ranks] == [3, 3]  # equal counts on every rank
        seen = sorted(i for b in batches for i in b["index"])
        assert seen == list(range(NUM_IMAGES))  # each image exactly once across workers
        for b in batches:
            assert b["keys"] == ["crop1", "crop2", "index", "pid", "skipped", "view1", "view2"]
            assert b["shapes"]["view1"] == b["shapes"]["view2"] == [4, 3, SIZE, SIZE]
            assert b["shapes"]["crop1"] == [4, 5] and b["dtypes"]["view1"] == "torch.float32"
            assert b["dtypes"]["index"] == "torch.int64" and sum(b["skipped"]) == 0
            for x1, y1, x2, y2, flip in b["crop1"] + b["crop2"]:
                assert 0 <= x1 < x2 and 0 <= y1 < y2 and flip in (0.0, 1.0)
            # Decoded in Ray Data's tasks, never in a training worker process.
            assert not set(b["pid"]) & train_pids
        views.append(
            {i: s for b in batches for i, s in zip(b["index"], b["view_sums"], strict=True)}
        )
    assert all(views[0][i] != views[1][i] for i in range(NUM_IMAGES))  # new views every epoch
    # No epoch after the first starts a decoding process: Ray reuses the first epoch's task
    # workers (an actor pool would start its actors again for every epoch).
    second = [b for r in ranks for b in r["epochs"][1]]
    started = {p: t for b in second for p, t in b["started"].items()}
    assert started and None not in started.values()
    assert max(started.values()) < min(r["epoch_starts"][1] for r in ranks)
    # Pass p draws the views the DataLoader path draws in epoch p (seed, p, index).
    reference = TwoViewDataset(ParquetImageDataset(shards), TwoViews(SIZE, AugmentConfig()), 3)
    for epoch in range(2):
        for i in (0, 13, 23):
            expected = reference[(epoch, i)]["view1"].sum().item()
            assert views[epoch][i] == pytest.approx(expected, abs=1e-4)


def test_uint8_views_and_colour_choices_reach_the_training_step(local_ray, shards):
    ds = two_view_dataset(
        str(shards), SIZE, {"photometric_on": "device"}, seed=0, concurrency=1, num_cpus=0.5
    )
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert batch["view1"].dtype == torch.uint8 and batch["photometric1"].dtype == torch.float32
    v1, v2, _, _ = to_device(batch, torch.device("cpu"), channels_last=False)
    assert v1.shape == v2.shape == (4, 3, SIZE, SIZE) and v1.dtype == torch.float32


def test_every_decoding_task_gets_a_block_of_at_most_block_rows_images(local_ray, shards):
    """A read yields few large blocks (here one per read task); a decoding task takes one block."""
    ds = two_view_dataset(
        shards, SIZE, {}, seed=0, concurrency=2, num_cpus=0.25, map_batch_size=4, block_rows=4
    ).materialize()
    assert ds.num_blocks() >= NUM_IMAGES // 4  # one block each without the split
    assert ds.count() == NUM_IMAGES


def test_shards_on_s3_with_a_custom_endpoint(local_ray, shards, s3_env, tmp_path):
    # The Ray workers started before this test set AWS_ENDPOINT_URL: the endpoint and the
    # credentials reach the read tasks only inside the filesystem given to read_parquet.
    make_bucket(s3_env.endpoint_url, "raydata")
    images = build_bundled_image_folder(tmp_path / "images", num_images=NUM_IMAGES)
    prepare_shards(str(images), "s3://raydata/shards", images_per_shard=10)
    ds = two_view_dataset(
        "s3://raydata/shards", SIZE, {}, seed=0, concurrency=1, num_cpus=0.5, read_num_cpus=0.25
    )
    rows = ds.select_columns(["index", "skipped", "crop1"]).take_all()
    assert sorted(int(r["index"]) for r in rows) == list(range(NUM_IMAGES))
    assert all(int(r["skipped"]) == 0 and r["crop1"].shape == (5,) for r in rows)
