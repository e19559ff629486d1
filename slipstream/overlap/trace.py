"""What the overlap benchmark and tests look at instead of the wall clock: an event trace
(put issued, put done, signal seen, tile started, tile done, with monotonic timestamps that
are comparable across the processes of one machine), and a simulated link that makes a put
take latency + bytes / bandwidth of wall time by sleeping, so the link costs no CPU and
compute and communication do not fight for the same two cores."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple


class Event(NamedTuple):
    t_ns: int
    rank: int
    kind: str
    """put_issued / put_done (peer = destination), signal_seen (peer = source),
    tile_start / tile_done (peer = the shard the tile belongs to)."""
    peer: int
    call: int


@dataclass(slots=True)
class Trace:
    rank: int
    events: list[Event] = field(default_factory=list)

    def record(self, kind: str, peer: int, call: int) -> None:
        self.events.append(Event(time.monotonic_ns(), self.rank, kind, peer, call))

    def clear(self) -> None:
        self.events.clear()


@dataclass(slots=True)
class SimLink:
    """One rank's outgoing link: puts leave one after another, each taking
    `latency_s + nbytes / bandwidth_bytes_per_s` seconds, slept rather than spent. Each put
    sleeps until an absolute deadline on the link's schedule, so a sleep that overshoots does
    not push back the puts after it (as a real link's transfers do not)."""

    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf
    _free_at: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.bandwidth_bytes_per_s <= 0:
            raise ValueError(
                f"SimLink: latency_s {self.latency_s} must be >= 0 and bandwidth "
                f"{self.bandwidth_bytes_per_s} > 0"
            )

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s

    def send(self, nbytes: int) -> None:
        delay = self.transfer_s(nbytes)
        if delay <= 0:
            return
        now = time.perf_counter()
        self._free_at = max(now, self._free_at) + delay
        time.sleep(max(0.0, self._free_at - now))


def tiles_before_last_put(events: list[Event], rank: int, call: int) -> int:
    """How many of `rank`'s tiles in `call` started before the last put into `rank` (by any
    peer) completed: > 1 means the consumer computed on arrived shards while later ones were
    still in flight, which is the overlap."""
    puts = [e.t_ns for e in events if e.kind == "put_done" and e.peer == rank and e.call == call]
    if not puts:
        return 0
    last = max(puts)
    return sum(
        1
        for e in events
        if e.kind == "tile_start" and e.rank == rank and e.call == call and e.t_ns < last
    )


def compute_busy_s(events: list[Event], rank: int, call: int) -> float:
    """Seconds `rank` spent inside tiles during `call`: the rest of the call's time on that
    rank is waiting or overhead."""
    starts = [
        e.t_ns for e in events if e.rank == rank and e.call == call and e.kind == "tile_start"
    ]
    dones = [e.t_ns for e in events if e.rank == rank and e.call == call and e.kind == "tile_done"]
    return sum(b - a for a, b in zip(starts, dones)) / 1e9
