"""Process groups from torchrun's environment, and data-parallel wrapping. One process and no
group by default; under `torchrun` a 2-D mesh of data x tensor parallel ranks (gloo on CPU,
NCCL on CUDA). Tensor-parallel groups are consecutive ranks (rank = dp_rank * tp + tp_rank),
so they stay inside a machine; DDP runs over the data-parallel groups, with a communication
hook that notes when each gradient bucket is ready, so the trainer can measure exposed
communication."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from slipstream.errors import PeerLost
from slipstream.topology import Topology

OVERLAP_CHOICES = ("auto", "shm", "cuda", "collective", "reference")


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelConfig:
    """How the ranks of a job split the work."""

    tp: int = 1
    """Tensor-parallel ranks per model replica (consecutive ranks); must divide the number of
    processes and model.n_head."""
    dp: int = 0
    """Data-parallel replicas; 0 = processes / tp. A value that disagrees with the launch is
    an error (a check that the job started as intended)."""
    overlap: str = "auto"
    """How tensor-parallel layers communicate: `shm` (symmetric memory across the processes
    of one machine, tile-ordered put/signal/wait), `cuda` (torch symmetric memory), `collective`
    (chunked async collectives, any backend), `reference` (blocking collectives, no overlap),
    or `auto` (cuda on GPUs, shm on CPUs)."""
    overlap_chunks: int = 2
    """Chunks per operation for the `collective` implementation."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.dp < 0:
            raise ValueError(f"parallel: tp {self.tp} must be >= 1 and dp {self.dp} >= 0")
        if self.overlap not in OVERLAP_CHOICES:
            raise ValueError(f"parallel.overlap: {self.overlap!r}; use one of {OVERLAP_CHOICES}")
        if self.overlap_chunks < 1:
            raise ValueError("parallel.overlap_chunks: must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class Dist:
    """This process's place in the job (`Topology`), its device, and its process groups."""

    topology: Topology = field(default_factory=Topology)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    """The tensor-parallel process group of this rank (None without tensor parallelism)."""
    dp_group: object = None
    """The data-parallel process group (None = all ranks)."""

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def tp_size(self) -> int:
        return self.topology.tp_size

    @property
    def is_main(self) -> bool:
        return self.topology.is_main

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.topology.dp_size

    @property
    def dp_rank(self) -> int:
        return self.topology.dp_rank

    @property
    def tp_rank(self) -> int:
        return self.topology.tp_rank


def launch_topology(tp_size: int = 1) -> Topology:
    """The job's layout as the launcher (torchrun) describes it in the environment: the only
    place the launcher's variables are read. One process alone without them."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Topology(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        tp_size=tp_size,
        run_id=env.get("TORCHELASTIC_RUN_ID", ""),
    )


# What the collectives' backends say when a peer has gone: gloo's closed or reset sockets and
# their timeouts, NCCL's aborted communicators.
_PEER_GONE = ("closed by peer", "reset by peer", "broken pipe", "connection refused",
              "socket timeout", "timed out", "nccl")  # fmt: skip


def is_peer_failure(e: BaseException, d: Dist) -> bool:
    if not d.enabled or not isinstance(e, RuntimeError) or isinstance(e, PeerLost):
        return False
    return isinstance(e, dist.DistError) or any(s in str(e).lower() for s in _PEER_GONE)


def lost_ranks(d: Dist, wait_s: float = 5.0) -> list[int] | None:
    """The ranks that no longer answer: each survivor marks itself in the job's key-value
    store (the launcher's, which outlives the workers under torchrun) and waits up to
    `wait_s` for the others. None when the store is gone too (without torchrun rank 0 holds
    it: then rank 0 is among the lost)."""
    try:
        # The default group's store: private in torch, but the one every rank shares.
        store = dist.distributed_c10d._get_default_store()
        store.set(f"slipstream/alive/{d.rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            here = [r for r in range(d.world_size) if store.check([f"slipstream/alive/{r}"])]
            if len(here) == d.world_size or time.monotonic() >= deadline:
                return sorted(set(range(d.world_size)) - set(here))
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - the store's host is gone with its process
        return None


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' but no CUDA device is visible; use 'cpu'")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"train.device: {name!r} is unknown; use auto, cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto", parallel: ParallelConfig | None = None) -> Dist:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun), joins the group and builds the
    data x tensor parallel mesh."""
    parallel = parallel or ParallelConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = parallel.tp
    if world % tp or (parallel.dp and parallel.dp * tp != world):
        raise ValueError(
            f"parallel: tp {tp} x dp {parallel.dp or 'auto'} does not fit {world} process(es); "
            f"launch tp x dp processes (torchrun --nproc_per_node {tp * max(parallel.dp, 1)})"
        )
    topology = launch_topology(tp)
    dev = pick_device(device, topology.local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    d = Dist(topology, dev)
    if tp > 1:
        # new_group is collective over all ranks: every rank creates every group, in order.
        for i in range(world // tp):
            group = dist.new_group(list(range(i * tp, (i + 1) * tp)))
            if d.dp_rank == i:
                d.tp_group = group
        if world > tp:
            for j in range(tp):
                group = dist.new_group(list(range(j, world, tp)))
                if d.tp_rank == j:
                    d.dp_group = group
    return d


def host_dp_group(d: Dist):
    """A gloo group over this rank's data-parallel peers, for collectives on host tensors (the
    offload engine's ZeRO-2 buckets): NCCL, the default group on GPUs, takes device tensors
    only. Collective: every rank calls it, in the same order."""
    world, tp = d.world_size, d.tp_size
    mine = None
    for j in range(tp):  # every rank creates every group, in order
        group = dist.new_group(list(range(j, world, tp)), backend="gloo")
        if d.tp_rank == j:
            mine = group
    return mine


def host_tp_group(d: Dist):
    """A gloo group over this rank's tensor-parallel peers, for collectives on host tensors
    (the offload engine's norm of split parameters). Collective, like `host_dp_group`."""
    world, tp = d.world_size, d.tp_size
    mine = None
    for i in range(world // tp):
        group = dist.new_group(list(range(i * tp, (i + 1) * tp)), backend="gloo")
        if d.dp_rank == i:
            mine = group
    return mine


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers across ranks (one small collective; a sync point)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


class AllReduceMeter:
    """Exposed data-parallel communication: from the last gradient bucket handed to the
    all-reduce (the end of backward's compute) to when backward returned (every bucket
    reduced). A `Meter`'s reader: read as backward's phase ends, it adds that wait."""

    def __init__(self) -> None:
        self.ready_s: list[float] = []  # when each bucket of the running backward was ready
        self.total_s = 0.0

    def exposed_s(self) -> float:
        if self.ready_s:
            self.total_s += max(0.0, time.perf_counter() - max(self.ready_s))
            self.ready_s.clear()
        return self.total_s


def wrap_ddp(model: torch.nn.Module, d: Dist):
    """DDP over the data-parallel group with a timed all-reduce hook, or None with one
    replica. Returns (ddp or None, the meter of its exposed all-reduce)."""
    meter = AllReduceMeter()
    if d.dp_size == 1:
        return None, meter
    from torch.nn.parallel import DistributedDataParallel as DDP

    # broadcast_buffers off: the only buffers (RoPE tables) are the same everywhere.
    ddp = DDP(
        model,
        broadcast_buffers=False,
        device_ids=[d.device] if d.device.type == "cuda" else None,
        process_group=d.dp_group,
    )
    ddp.register_comm_hook((meter.ready_s, d.dp_group), timed_allreduce)
    return ddp, meter


def timed_allreduce(state: tuple[list[float], object], bucket):
    """DDP comm hook: the default all-reduce (averaged over the data-parallel group), noting
    when each bucket is ready."""
    times, group = state
    times.append(time.perf_counter())
    world = dist.get_world_size(group)
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))
