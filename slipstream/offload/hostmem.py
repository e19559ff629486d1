"""Host buffers for the optimizer's state, in transparent huge pages where the OS offers them.

The host step streams 4 buffers in and 3 out, each hundreds of MiB. In 4 KiB pages that is a
TLB miss every 1,024 floats per stream; in 2 MiB pages, almost none. Recorded in
`benchmarks/results/2026-11-29-host-adam-thp.md`: torch's fused AdamW, the same pass, runs
7-11% faster on huge pages than on 4 KiB ones in one run, and this engine's step reaches
96-100% of the memory floor on them (86-90% on 4 KiB pages in `2026-11-29-host-adam-rounds.md`).
torch's CPU allocator asks for huge pages only when `THP_MEM_ALLOC_ENABLE=1` is set before
it starts, so these buffers are mapped here instead: private anonymous memory, advised
`MADV_HUGEPAGE` (which is what THP's common `madvise` mode waits for), 2 MiB aligned.

On CUDA, buffers a device copies from stay in pinned memory (`pin=True`: torch's pinned
allocator): the fp32 masters of an fp32 model, the bf16 copy of a bf16 model's new weights.
Everything else (gradients, moments, a bf16 model's fp32 masters; on a CPU, all of it) is in
huge pages. The bf16 copy matters too: the step writes it in the same pass, which costs
+4-7% over the plain step with every buffer in huge pages (+7-12% on 4 KiB pages, recorded in
the same two files).
Where the OS has no `MADV_HUGEPAGE` (not Linux) or a buffer is small, this is `torch.empty`.

Because these bytes bypass malloc, `live_bytes()` counts them, for memory measurements that
read malloc's own counters (`benchmarks/offload_train.py`).
"""

from __future__ import annotations

import mmap
import threading
import warnings
import weakref
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_live = [0]
_lock = threading.Lock()
_warned = [False]


def thp_mode(setting: Path = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`), or None
    where there is no such setting (not Linux)."""
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _warn_if_off() -> None:
    if _warned[0]:
        return
    _warned[0] = True
    if thp_mode(THP_SETTING) == "never":
        warnings.warn(
            "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled is "
            "'never'): the offload engine's host step runs about 10% slower in 4 KiB pages. "
            "`echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled` turns "
            "them on for the programs that ask, as this one does",
            stacklevel=3,
        )


def _freed(nbytes: int) -> None:
    with _lock:
        _live[0] -= nbytes


def _map(numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A 1-d tensor on fresh huge-page memory (zeros), or None where that does not apply."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    _warn_if_off()
    size = nbytes + HUGE_PAGE  # room to start on a 2 MiB boundary; the head is never touched
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    out = torch.frombuffer(buf, dtype=dtype, count=numel, offset=-base % HUGE_PAGE)
    with _lock:
        _live[0] += nbytes
    weakref.finalize(buf, _freed, nbytes)  # unmapped when the last tensor on it goes
    return out


def host_empty(
    numel: int, dtype: torch.dtype = torch.float32, *, pin: bool = False
) -> torch.Tensor:
    """A 1-d host tensor: pinned if `pin`, else in huge pages if it spans one."""
    out = None if pin else _map(numel, dtype)
    return torch.empty(numel, dtype=dtype, pin_memory=pin) if out is None else out


def host_zeros(
    numel: int, dtype: torch.dtype = torch.float32, *, pin: bool = False
) -> torch.Tensor:
    """`host_empty`, zeroed (fresh mapped memory already is: it is not written twice)."""
    out = None if pin else _map(numel, dtype)
    return torch.zeros(numel, dtype=dtype, pin_memory=pin) if out is None else out


def live_bytes() -> int:
    """Bytes of huge-page buffers alive now (malloc does not see them)."""
    return _live[0]
