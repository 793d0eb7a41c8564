"""The model under torch.distributed (2 CPU processes, gloo): Shuffle BN, gathered keys, DDP.

With BatchNorm in eval mode the result cannot depend on how the batch is split, so 2 ranks × 4
pairs must reproduce 1 process × 8 pairs exactly: loss, DDP-averaged gradients, image-bank
contents. That checks the shuffle/unshuffle bookkeeping (boxes travel with their images), the
all-gather order and the global normalisation of the patch loss. A train-mode step then checks
that every rank ends with identical banks.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from dupr.model import DUPR
from helpers import random_batch, tiny_model_config

WORLD, PER_RANK = 2, 4


def make_model():
    torch.manual_seed(0)
    return DUPR(tiny_model_config(queue_size=40, patch_keys_per_enqueue=6))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank: int, store_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        model = make_model().eval()
        batch = [
            t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in random_batch(WORLD * PER_RANK, 64)
        ]
        ddp = DDP(model, forward_sync_buffers=False)
        loss, metrics = ddp(*batch)
        loss.backward()
        result = {
            "loss": loss.detach(),
            "grads": grads(model),
            "banks": {n: (b.keys.clone(), b.ptr.clone()) for n, b in model.banks.items()},
        }
        # A train-mode step with Shuffle BN: runs, and leaves the same banks on every rank.
        model.train()
        loss, _ = ddp(
            *[t[rank * PER_RANK : (rank + 1) * PER_RANK] for t in random_batch(8, 64, seed=1)]
        )
        loss.backward()
        result["train_banks"] = {n: b.keys.clone() for n, b in model.banks.items()}
        torch.save(result, os.path.join(store_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    mp.start_processes(worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = make_model().eval()
    loss, _ = single(*random_batch(WORLD * PER_RANK, 64))
    loss.backward()

    # DDP averages gradients; the per-rank losses average to the single-process loss.
    assert torch.allclose(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), rtol=1e-5)
    expected = grads(single)
    assert ranks[0]["grads"].keys() == expected.keys()
    for name, g in expected.items():
        for r in ranks:
            assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-6), name

    for name, bank in single.banks.items():
        keys0, ptr0 = ranks[0]["banks"][name]
        keys1, ptr1 = ranks[1]["banks"][name]
        assert torch.equal(keys0, keys1) and ptr0 == ptr1 == bank.ptr  # same keys on every rank
        if name.startswith("image"):  # the global batch, in rank order
            assert torch.allclose(keys0[:8], bank.keys[:8], atol=1e-5)
        else:  # 6 patch keys for the global batch, 3 from each rank
            assert ptr0.item() == 6
    for name in single.banks:
        assert torch.equal(ranks[0]["train_banks"][name], ranks[1]["train_banks"][name])


def syncbn_worker(rank: int, store_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD
    )
    try:
        torch.manual_seed(0)
        model = DUPR(tiny_model_config(bn_mode="sync", queue_size=40)).double()  # train mode
        batch = [
            t[rank * PER_RANK : (rank + 1) * PER_RANK].double()
            for t in random_batch(WORLD * PER_RANK, 64)
        ]
        ddp = DDP(model, forward_sync_buffers=False)
        loss, _ = ddp(*batch)
        loss.backward()
        bn = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        torch.save(
            {"loss": loss.detach(), "grads": grads(model), "bn": bn},
            os.path.join(store_dir, f"sync{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_syncbn_in_train_mode_two_ranks_equal_one_process(tmp_path):
    """With bn_mode="sync" (CPU path of dupr.sync_batchnorm) BatchNorm sees the global batch.

    In float64: the ranks compute the variance as E[x²] - mean² from all-reduced sums, the single
    process with BatchNorm's own kernel. In float32 training-mode BatchNorm amplifies that
    rounding difference through the backward pass (conv1's gradients differed by 0.4 % in places
    on an AVX2 CPU, within the old 0.1 % tolerance on an AVX-512 one); in float64 both agree far
    below any tolerance that a wrong statistic could pass."""
    mp.start_processes(syncbn_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"sync{r}.pt") for r in range(WORLD)]
    torch.manual_seed(0)
    single = DUPR(tiny_model_config(bn_mode="sync", queue_size=40)).double()
    loss, _ = single(*[t.double() for t in random_batch(WORLD * PER_RANK, 64)])
    loss.backward()
    assert torch.allclose(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), rtol=1e-9)
    for name, g in grads(single).items():
        assert torch.allclose(ranks[0]["grads"][name], g, rtol=1e-7, atol=1e-10), name
    for name, b in single.named_buffers():
        if "running" in name:  # global statistics, the same on both ranks
            assert torch.allclose(ranks[0]["bn"][name], b, rtol=1e-9, atol=1e-12), name
            assert torch.equal(ranks[0]["bn"][name], ranks[1]["bn"][name]), name
