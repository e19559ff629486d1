"""The host AdamW kernel (`kernels/adamw.c`), built and cached by `slipstream.native` (`make`
builds it with the environment: `kernel.build()`). Returns None when no compiler is available;
callers then use `torch_adamw_step`, the same math in torch ops."""

from __future__ import annotations

import ctypes
from pathlib import Path

from slipstream import native

SOURCE = Path(__file__).with_name("kernels") / "adamw.c"
# -ffp-contract=off: no fused multiply-add, so the bits match across vector and scalar paths
# (thread counts); -fno-math-errno lets sqrtf vectorize (twice the speed); -march=native: the
# cache key includes the CPU's flags, so another machine never loads this build.
FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


def build(verbose: bool = False) -> Path | None:
    """Compile the kernel into the cache (once); its path, or None without a C compiler."""
    return native.build(SOURCE, FLAGS, verbose)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if it cannot be built."""
    return native.load(SOURCE, FLAGS, _declare)


KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}  # the kernel's dtype codes


def kind(t) -> int | None:
    """The kernel's code for tensor t's dtype; None for a dtype it does not read."""
    return KINDS.get(str(t.dtype).removeprefix("torch."))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.adamw_fused.argtypes = [p, p, p, p, i32, p, p, i64] + [f32] * 8 + [i32]
    lib.adamw_fused.restype = None
    lib.stage_grad.argtypes = [p, i32, p, p, i32, i64, i32]
    lib.stage_grad.restype = ctypes.c_double
    lib.grad_sumsq.argtypes = [p, i32, p, i64, i32]
    lib.grad_sumsq.restype = ctypes.c_double
    lib.grad_add.argtypes = [p, p, i32, i64, i32]
    lib.grad_add.restype = None
    lib.access_probe.argtypes = [p, p, p, p, i64, i32]
    lib.access_probe.restype = None
