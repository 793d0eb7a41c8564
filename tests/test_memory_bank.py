"""Memory bank: FIFO order, wrap-around for any K, normalisation, state round-trip."""

import io

import torch
import torch.nn.functional as F

from dupr.memory_bank import MemoryBank


def test_initial_keys_are_unit_vectors():
    bank = MemoryBank(50, 8)
    assert torch.allclose(bank.keys.norm(dim=1), torch.ones(50))
    assert bank.ptr.item() == 0


def test_enqueue_wraps_around_when_k_is_not_a_multiple():
    bank = MemoryBank(10, 4)
    batches = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    for b in batches:
        bank.enqueue(b)
    assert bank.ptr.item() == 2  # 12 keys written into 10 slots
    assert torch.allclose(bank.keys[0:2], batches[2][2:4])  # newest overwrote the oldest
    assert torch.allclose(bank.keys[2:4], batches[0][2:4])  # survivors of the first batch
    assert torch.allclose(bank.keys[4:8], batches[1])
    assert torch.allclose(bank.keys[8:10], batches[2][0:2])


def test_enqueue_more_than_k_keeps_the_newest_and_normalises():
    bank = MemoryBank(5, 3)
    new = torch.randn(12, 3) * 7
    bank.enqueue(new)
    kept = F.normalize(new[-5:], dim=1)
    assert sorted(map(tuple, bank.keys.tolist())) == sorted(map(tuple, kept.tolist()))
    assert torch.allclose(bank.keys.norm(dim=1), torch.ones(5))
    bank.enqueue(torch.randn(0, 3))  # nothing to add: a no-op
    assert bank.keys.norm(dim=1).allclose(torch.ones(5))


def test_keys_and_pointer_travel_with_the_state_dict():
    bank = MemoryBank(16, 4)
    bank.enqueue(torch.randn(7, 4))
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = MemoryBank(16, 4)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.keys, bank.keys) and other.ptr.item() == 7


def test_flagged_enqueue_adds_only_the_flagged_keys_even_beyond_k():
    bank = MemoryBank(5, 3)
    new = torch.randn(8, 3)
    flags = torch.tensor([True] * 6 + [False] * 2)  # valid keys first, then padding
    bank.enqueue(new, flags)
    assert bank.ptr.item() == 6 % 5
    assert torch.allclose(bank.keys[torch.tensor([1, 2, 3, 4, 0])], F.normalize(new[1:6], dim=1))
