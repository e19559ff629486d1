"""The shm symmetric heap across real processes (gloo for the rendezvous): put / signal / wait,
flags that are never reset, a bounded wait that explains itself, fast failure when a peer
dies, and no shared memory left behind."""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
import torch

from slipstream.overlap.flags import SignalTimeout
from slipstream.overlap.symmetric import SHM_DIR, SHM_PREFIX, ShmHeap, remove_stale_segments
from tests.overlap.ranks import run_ranks, values


def _segments() -> set[str]:
    return set(glob.glob(f"{SHM_DIR}/{SHM_PREFIX}-*"))


def _put_signal_wait(rank: int, world: int) -> dict:
    heap = ShmHeap(4096, num_flags=4)
    buf = heap.alloc("buf", (world, 8), torch.float32)
    ready, counter = heap.add_flags(["ready", "counter"]), None
    counter = ready + 1
    seen = []
    for epoch in range(1, 4):  # flags are never reset: each round waits for a higher value
        for dst in range(world):
            heap.put(dst, buf, torch.full((8,), 100.0 * epoch + rank), index=rank)
        for dst in range(world):
            heap.signal(dst, ready, epoch)  # one slot per writer: value = sum of slots
        heap.wait_until(ready, epoch * world, timeout_s=30)
        seen.append(heap.local(buf)[:, 0].tolist())
        heap.barrier()  # nobody overwrites a row before everyone has read this round
    for _ in range(5):
        heap.signal(0, counter, 1, op="add")
    if rank == 0:
        heap.wait_until(counter, 5 * world, timeout_s=30)
    heap.barrier()
    return {"seen": seen, "counter": heap.flags.value(counter)}


def test_put_signal_wait_deliver_every_rank_data_round_after_round(tmp_path):
    world = 3
    before = _segments()
    out = values(run_ranks(_put_signal_wait, world, tmp_path))
    for res in out:
        for epoch, row in enumerate(res["seen"], start=1):
            assert row == [100.0 * epoch + r for r in range(world)]
    assert out[0]["counter"] == 5 * world  # "add" from 3 writers, none lost
    assert _segments() <= before  # every segment unlinked


def _dropped_signal(rank: int, world: int) -> float:
    heap = ShmHeap(64, num_flags=1)
    flag = heap.add_flags(["never.signalled"])
    t0 = time.monotonic()
    if rank == 0:
        heap.wait_until(flag, 1, timeout_s=1.0)
    else:  # waits on something that will not come either; rank 0's abort must end it
        heap.wait_until(flag, 1, timeout_s=60)
    return time.monotonic() - t0


def test_dropped_signal_fails_within_timeout_with_the_flags_and_stops_the_peers(tmp_path):
    out = run_ranks(_dropped_signal, 2, tmp_path)
    status, text = out[0]
    assert status == "error" and text.startswith("SignalTimeout")
    assert "rank 0" in text and "never.signalled" in text and ">= 1" in text
    assert "slots=[0, 0]" in text  # every flag's value is in the dump
    status, text = out[1]
    assert status == "error" and text.startswith("PeerFailed")  # not its own 60 s timeout
    assert "rank(s) [0] failed" in text


def _killed_rank(rank: int, world: int) -> float:
    heap = ShmHeap(64, num_flags=1)
    flag = heap.add_flags(["work.done"])
    heap.barrier()
    if rank == 1:
        os.kill(os.getpid(), 9)
    t0 = time.monotonic()
    heap.wait_until(flag, 1, timeout_s=60)
    return time.monotonic() - t0


def test_killed_rank_makes_the_others_fail_fast_and_leaves_no_shared_memory(tmp_path):
    before = _segments()
    t0 = time.monotonic()
    out = run_ranks(_killed_rank, 3, tmp_path)
    assert out[1] == ("died", -9)
    for rank in (0, 2):
        status, text = out[rank]
        assert status == "error" and text.startswith("PeerFailed"), text
        assert "rank 1" in text
    # Failing fast means long before the 60 s timeout (liveness is checked every 50 ms).
    assert time.monotonic() - t0 < 45
    assert _segments() <= before


def test_stale_segment_of_a_dead_process_is_removed(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that surely is dead now
    path = f"{SHM_DIR}/{SHM_PREFIX}-test-r0-{pid}"
    with open(path, "wb") as f:
        f.write(b"x")
    assert remove_stale_segments() >= 1
    assert not os.path.exists(path)


def test_one_rank_heap_and_clear_errors_without_a_group():
    heap = ShmHeap(128, num_flags=2)
    region = heap.alloc("x", (4,), torch.float64)
    heap.put(0, region, torch.arange(4.0, dtype=torch.float64))
    assert heap.local(region).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="larger nbytes"):
        heap.alloc("y", (1000,), torch.float32)
    with pytest.raises(ValueError, match="larger num_flags"):
        heap.add_flags(["a", "b", "c"])
    with pytest.raises(SignalTimeout, match="timed out after 0.1s"):
        heap.wait_until(heap.add_flags(["f"]), 1, timeout_s=0.1)
    with pytest.raises(ValueError, match="'set' or 'add'"):
        heap.signal(0, 2, 1, op="max")
    heap.close()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_peer_that_aborts_and_exits_during_the_check_is_not_named_the_root(monkeypatch):
    """Rank 1 dies; rank 0 sees it, aborts and exits just as rank 2 checks its peers. Rank 2
    must name rank 1 (died without aborting), not rank 0 (only echoed the failure)."""
    from slipstream.overlap import flags as signals

    world, pids = 3, [_dead_pid(), _dead_pid(), os.getpid()]
    tables = [np.zeros((signals.NUM_SYSTEM_FLAGS + 1, world), dtype=np.int64) for _ in range(3)]
    names = ["system.abort", "system.barrier", "work.done"]
    rank0 = signals.FlagTable(0, tables[0], tables, pids, names)
    rank2 = signals.FlagTable(2, tables[2], tables, pids, names)
    real_alive = signals.process_alive

    def rank0_aborts_then_exits(pid: int) -> bool:
        if pid == pids[0]:
            rank0.abort()  # lands between rank 2's reads of the table
        return real_alive(pid)

    monkeypatch.setattr(signals, "process_alive", rank0_aborts_then_exits)
    with pytest.raises(signals.PeerFailed, match=r"rank 2: rank 1 \(pid \d+\) exited") as err:
        rank2.wait_until(2, 1, timeout_s=5)
    assert "rank 0" not in str(err.value)
    assert tables[0][signals.ABORT][2] == 1  # rank 2 told the others in turn
