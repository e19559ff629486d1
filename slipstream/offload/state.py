"""The engine's state across ZeRO-2 slices: each rank saves only its own slices (no gather: a
rank never holds the whole optimizer state), and any number of ranks loads every rank's saved
state, each reading only the span of each bucket it now owns (memory-mapped shards stay on
disk otherwise)."""

from __future__ import annotations

import torch

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.offload.buckets import Bucket
from slipstream.offload.host_adam import HostAdamW
from slipstream.offload.hostmem import host_zeros

STATE_VERSION = 2
MOMENTS = ("exp_avg", "exp_avg_sq")


def save_slices(buckets: list[Bucket], host: HostAdamW, world: int, rank: int, **extra) -> dict:
    """This rank's slices (one process: the whole state), marked `shard` when W > 1."""
    entries = []
    for b in buckets:
        st = host.state.get(b.master, {})
        keep = b.numel if world == 1 else b.master.numel()
        entry = {
            "numel": b.numel,
            "master": b.master.detach()[:keep].clone(),
            "step": float(st.get("step", 0.0)),
        }
        for key in MOMENTS:
            entry[key] = st[key].detach()[:keep].clone() if key in st else None
        entries.append(entry)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in host.param_groups]
    out = {VERSION_KEY: STATE_VERSION, "buckets": entries, "groups": groups, **extra}
    if world > 1:
        out["shard"] = {"rank": rank, "world": world}
    return out


@torch.no_grad()
def load_slices(buckets: list[Bucket], host: HostAdamW, rank: int, state: dict) -> dict:
    """Load a whole state, or `{"shards": [...]}` (every rank's `save_slices` of a sharded
    run, in rank order, saved with any number of ranks) into this rank's slices and the
    model's weights. Returns the first shard (its extra entries)."""
    shards = state.get("shards", [state])
    for st in shards:
        check_version(st, STATE_VERSION, "offload optimizer state")
    world = shards[0].get("shard", {}).get("world", 1)
    if [st.get("shard", {}).get("rank", 0) for st in shards] != list(range(world)):
        raise ValueError(
            f"offload optimizer state: {len(shards)} shard(s) of a {world}-rank run; "
            "every rank's file is needed (checkpoints/.../optimizer*.shard<rank>.pt)"
        )
    first = shards[0]
    numels = [e.get("numel", e["master"].numel()) for e in first["buckets"]]
    if numels != [b.numel for b in buckets]:
        raise ValueError(
            "offload optimizer state: its buckets do not match this model's; resume with "
            "the model and bucket size it was saved with"
        )
    for g, saved in zip(host.param_groups, first["groups"], strict=True):
        g.update(saved)
    for k, b in enumerate(buckets):
        saved = [st["buckets"][k] for st in shards]
        size = b.master.numel()  # this run's slice, padded to its world size
        lo, hi = rank * size, min((rank + 1) * size, b.numel)
        full = torch.zeros(b.padded, dtype=torch.float32)  # a transient
        full[: b.numel].copy_(_span([e["master"] for e in saved], 0, b.numel))
        b.master.copy_(full[rank * size : (rank + 1) * size])
        if saved[0]["exp_avg"] is not None:
            st = host.state[b.master]
            st["step"] = torch.tensor(saved[0]["step"])
            for key in MOMENTS:
                mine = host_zeros(size)
                if hi > lo:
                    mine[: hi - lo].copy_(_span([e[key] for e in saved], lo, hi))
                st[key] = mine
        for i, p in enumerate(b.params):
            p.copy_(b.view(full, i))
    return first


def _span(parts: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the concatenation of `parts` (equal sizes but the last), reading
    only the parts that overlap it."""
    out, start = [], 0
    for t in parts:
        a, b = max(lo, start), min(hi, start + t.numel())
        if a < b:
            out.append(t[a - start : b - start])
        start += t.numel()
    if start < hi:
        raise ValueError(f"offload optimizer state: {start} elements saved, {hi} needed")
    return torch.cat(out) if len(out) != 1 else out[0]
