"""The host AdamW kernel (`kernels/adamw.c`), compiled once per machine with the system's C
compiler and cached, so no run waits for a compiler twice (about 1 s the first time;
`make` builds it with the environment: `kernel.build()`). Loaded with ctypes: plain C, no torch headers, no
Python extension build. Returns None when no compiler is available; callers then use
`torch_adamw_step`, the same math in torch ops."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

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
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return (
        Path(os.environ.get("SLIPSTREAM_CACHE", Path.home() / ".cache" / "slipstream")) / "kernels"
    )


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    key = hashlib.sha256(
        "|".join([SOURCE.read_text(), *FLAGS, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"adamw-{key}.so"


def build(verbose: bool = False) -> Path | None:
    """Compile the kernel into the cache (once); its path, or None without a C compiler."""
    out = library_path()
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        if verbose:
            print(res.stderr)
        return None
    os.replace(tmp, out)  # atomic: a concurrent build never leaves a half-written library
    return out


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if it cannot be built."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            path = build()
            if path is not None:
                _lib = _declare(ctypes.CDLL(str(path)))
    return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.adamw_step.argtypes = [p, p, p, p, p, i64, f32, f32, f32, f32, f32, f32, f32, f32, i32]
    lib.adamw_step.restype = None
    lib.sum_squares.argtypes = [p, i64, i32]
    lib.sum_squares.restype = ctypes.c_double
    lib.access_probe.argtypes = [p, p, p, p, i64, i32]
    lib.access_probe.restype = None
    return lib
