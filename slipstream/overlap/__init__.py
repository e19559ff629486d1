"""Communication overlap: a symmetric heap with put / signal / wait (`shm` across local
processes, `cuda` over torch's symmetric memory), tile-ordered all-gather + matmul and
matmul + reduce-scatter on it (or on chunked async collectives), a Triton consumer GEMM that
waits on tile flags, and the tensor-parallel linear layers built from them."""

from slipstream.overlap.ag_gemm import all_gather_matmul
from slipstream.overlap.flags import PeerFailed, SignalTimeout
from slipstream.overlap.gemm_rs import matmul_reduce_scatter
from slipstream.overlap.group import IMPLEMENTATIONS, OverlapGroup, create_heap
from slipstream.overlap.symmetric import ShmHeap, SymmetricHeap
from slipstream.overlap.trace import SimLink, Trace

__all__ = [
    "IMPLEMENTATIONS",
    "OverlapGroup",
    "PeerFailed",
    "ShmHeap",
    "SignalTimeout",
    "SimLink",
    "SymmetricHeap",
    "Trace",
    "all_gather_matmul",
    "create_heap",
    "matmul_reduce_scatter",
]
