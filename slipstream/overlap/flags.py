"""Epoch flags and the wait on them: what a symmetric heap's `signal` and `wait_until` do to the
flag words, and the diagnostic when a wait gives up. Owns no memory (the heap does).

A flag is a row of int64 slots, one per writer rank: a writer only ever stores into its own
slot, so "add" is a plain read-modify-write by one process and needs no cross-process atomic.
A flag's value is the sum of its slots. Flags are never reset: each collective call has an
epoch (1, 2, 3, ...) and waits for `value >= epoch`, so a late reader of call N cannot be
fooled by call N+1 and nothing has to be cleared between calls.

Memory ordering: a producer stores its data, then the flag. x86-64 keeps stores in program
order as seen by other cores (TSO) and keeps loads in order, so a reader that sees the flag
sees the data. On weaker memory models (ARM) the shm backend would need a fence between the
two stores; the cuda backend orders them by stream order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

ABORT, BARRIER = 0, 1
"""System flags at the top of every heap's table: a rank that fails raises its abort slot on
every peer (so they fail at once instead of at their timeout); the heap's barrier counter."""
NUM_SYSTEM_FLAGS = 2
DEFAULT_TIMEOUT_S = float(os.environ.get("SLIPSTREAM_OVERLAP_TIMEOUT_S", "60"))
_LIVENESS_EVERY_S = 0.05


class SignalTimeout(RuntimeError):
    """A wait gave up: the message holds the rank, the flag, the value it waited for and every
    flag's value, which is what it takes to see which peer did not signal."""


class PeerFailed(RuntimeError):
    """A peer rank died or aborted while this rank waited on it."""


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class FlagTable:
    """One rank's flags as numpy views of shared int64 words: `local` is this rank's table
    [num_flags, world] (peers write into it), `peers[r]` is rank r's table (this rank writes
    its own slot there). `names` label flags in diagnostics."""

    def __init__(
        self,
        rank: int,
        local: np.ndarray,
        peers: Sequence[np.ndarray],
        peer_pids: Sequence[int],
        names: list[str],
    ) -> None:
        self.rank, self.local, self.peers = rank, local, list(peers)
        self.peer_pids = list(peer_pids)
        self.names = names

    @property
    def world_size(self) -> int:
        return len(self.peers)

    def value(self, flag: int) -> int:
        return int(self.local[flag].sum())

    def signal(self, rank: int, flag: int, value: int, op: str = "set") -> None:
        slot = self.peers[rank][flag]
        if op == "set":
            slot[self.rank] = value
        elif op == "add":
            slot[self.rank] += value  # only this rank writes this slot: no lost update
        else:
            raise ValueError(f"signal op {op!r}: use 'set' or 'add'")

    def abort(self) -> None:
        """Tell every rank, this one included (its producer thread may be waiting), that this
        rank has failed: their waits raise PeerFailed at their next liveness check."""
        for r in range(self.world_size):
            self.signal(r, ABORT, 1)

    def wait_until(
        self,
        flag: int,
        value: int,
        timeout_s: float | None = None,
        on_spin: Callable[[], None] | None = None,
    ) -> float:
        """Block until flag's value >= `value`; returns the seconds waited. Spins briefly, then
        backs off to short sleeps, which cost no CPU (the matmuls this overlaps need the
        cores). Checks peers' liveness and abort slots as it waits."""
        row = self.local[flag]
        if row.sum() >= value:
            return 0.0
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        t0 = time.monotonic()
        next_check, sleep_s, spins = t0 + _LIVENESS_EVERY_S, 0.0, 0
        while row.sum() < value:
            spins += 1
            if spins > 64:
                sleep_s = min(max(sleep_s * 2, 2e-6), 5e-5)  # <= 50 us late on a signal
                time.sleep(sleep_s)
            if on_spin is not None:
                on_spin()
            now = time.monotonic()
            if now >= next_check:
                self._check_peers(flag, value)
                next_check = now + _LIVENESS_EVERY_S
            if now - t0 > timeout_s:
                self.abort()
                raise SignalTimeout(self.describe(flag, value, timeout_s))
        return time.monotonic() - t0

    def _check_peers(self, flag: int, value: int) -> None:
        # Liveness first, abort slots second: a rank writes its abort slot before it exits, so
        # a peer seen dead here whose slot is still clear died without aborting: the root
        # cause. A dead peer that did abort only echoes another's failure. (Reading the slots
        # first would race with a peer that aborts and exits between the two reads.)
        dead = [
            (r, pid)
            for r, pid in enumerate(self.peer_pids)
            if r != self.rank and not process_alive(pid)
        ]
        if dead and self.local[flag].sum() >= value:
            return  # the peer signalled, then exited (its write came before its exit)
        aborted = [r for r in range(self.world_size) if self.local[ABORT][r]]
        roots = [(r, pid) for r, pid in dead if r not in aborted]
        if roots:
            self.abort()
            r, pid = roots[0]
            raise PeerFailed(
                f"rank {self.rank}: rank {r} (pid {pid}) exited while this rank waited for "
                f"{self._flag_name(flag)} >= {value}"
            )
        if aborted:
            raise PeerFailed(
                f"rank {self.rank}: rank(s) {aborted} failed while this rank waited for "
                f"{self._flag_name(flag)} >= {value}; see their error"
            )

    def _flag_name(self, flag: int) -> str:
        return f"flag {flag} ({self.names[flag]})" if flag < len(self.names) else f"flag {flag}"

    def describe(self, flag: int, value: int, timeout_s: float) -> str:
        rows = [
            f"  {i:3d} {self.names[i] if i < len(self.names) else '?':24s} "
            f"sum={int(self.local[i].sum())} slots={self.local[i].tolist()}"
            for i in range(len(self.local))
        ]
        return (
            f"rank {self.rank}: timed out after {timeout_s:.1f}s waiting for "
            f"{self._flag_name(flag)} >= {value} (it is {self.value(flag)}). A peer did not "
            "signal: it is slower than the timeout (raise SLIPSTREAM_OVERLAP_TIMEOUT_S), stuck, "
            "or called a different collective. Flags on this rank (slot = writer rank):\n"
            + "\n".join(rows)
        )
