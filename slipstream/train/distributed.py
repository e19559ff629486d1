"""Process groups from torchrun's environment, and data-parallel wrapping. One process and no
group by default; under `torchrun` a data-parallel group over all ranks (gloo on CPU, NCCL on
CUDA), with DDP whose communication hook notes when each gradient bucket is ready, so the
trainer can measure exposed communication. A 2-D mesh (data x tensor parallel) goes here."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


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


def init_distributed(device: str = "auto") -> Dist:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and joins the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


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


def wrap_ddp(model: torch.nn.Module, d: Dist):
    """DDP around `model` with a timed all-reduce hook, or None on one process. Returns
    (ddp or None, the list the hook appends bucket-ready times to)."""
    times: list[float] = []
    if not d.enabled:
        return None, times
    from torch.nn.parallel import DistributedDataParallel as DDP

    # broadcast_buffers off: the only buffers (RoPE tables) are the same everywhere.
    ddp = DDP(
        model,
        broadcast_buffers=False,
        device_ids=[d.device] if d.device.type == "cuda" else None,
    )
    ddp.register_comm_hook(times, timed_allreduce)
    return ddp, times


def timed_allreduce(times: list[float], bucket):
    """DDP comm hook: the default all-reduce (averaged), noting when each bucket is ready."""
    times.append(time.perf_counter())
    world = dist.get_world_size()
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))
