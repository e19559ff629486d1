"""Small C kernels, compiled once per machine with the system's C compiler and cached, so no run
waits for a compiler twice (about 1 s the first time; `make` builds them with the environment).
Loaded with ctypes: plain C, no Python headers, no extension build. Every kernel has a Python or
torch twin with the same results, used when no compiler is available."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from slipstream.cache import cache_root

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(source: Path, flags: Sequence[str]) -> Path:
    """Where `source` built with `flags` is cached. The key holds the source, the flags, the
    architecture and the CPU's feature flags, so another machine never loads this build."""
    key = hashlib.sha256(
        "|".join([source.read_text(), *flags, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path, flags: Sequence[str], verbose: bool = False) -> Path | None:
    """Compile `source` into the cache (once); its path, or None without a working compiler."""
    out = library_path(source, flags)
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    res = subprocess.run(
        [cc, *flags, str(source), "-o", str(tmp), "-lm"], capture_output=True, text=True
    )
    if res.returncode != 0:
        if verbose:
            print(res.stderr)
        return None
    os.replace(tmp, out)  # atomic: a concurrent build never leaves a half-written library
    return out


def load(
    source: Path, flags: Sequence[str], declare: Callable[[ctypes.CDLL], None]
) -> ctypes.CDLL | None:
    """The compiled `source`, building it on first use (once per process); None if it cannot be
    built or `SLIPSTREAM_NATIVE=0`. `declare` sets the functions' argument types."""
    if os.environ.get("SLIPSTREAM_NATIVE", "1") == "0":
        return None
    with _lock:
        if source not in _loaded:
            path = build(source, flags)
            lib = None
            if path is not None:
                lib = ctypes.CDLL(str(path))
                declare(lib)
            _loaded[source] = lib
    return _loaded[source]
