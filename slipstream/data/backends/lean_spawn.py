"""A "spawn" multiprocessing context whose children do not import the parent's main module.

A spawned child normally runs the parent's `__main__` again (as `__mp_main__`) before its
first task. For a trainer that is the training script, which imports torch: every loader
worker then holds its own copy of torch (about 150 MiB of private memory here) though it only
reads files and tokenizes. Loader tasks are module-level functions of this package, so their
workers need nothing from `__main__`: this context leaves it out, and a worker holds the
interpreter, numpy, the tokenizer and its sources' state. (A source whose transform is
defined in `__main__` needs the script: the local backend uses plain spawn for it.)

The launcher below is the standard posix spawn launch with main left out of the preparation
data it sends. Where the standard library lacks a piece it uses (another platform or Python),
`get_context` falls back to the plain spawn context: correct, only larger.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from multiprocessing import context, spawn, util

_MAIN_KEYS = ("init_main_from_name", "init_main_from_path")


def _lean_popen():
    try:
        from multiprocessing import popen_spawn_posix, resource_tracker

        base = popen_spawn_posix.Popen
        needed = (spawn.get_command_line, util.spawnv_passfds, resource_tracker.getfd)
        needed += (context.set_spawning_popen, context.reduction.dump, base._launch)
    except (ImportError, AttributeError):  # pragma: no cover - another platform or Python
        return None

    class LeanPopen(base):
        def _launch(self, process_obj) -> None:
            tracker_fd = resource_tracker.getfd()
            self._fds.append(tracker_fd)
            prep = spawn.get_preparation_data(process_obj._name)
            for key in _MAIN_KEYS:
                prep.pop(key, None)
            payload = io.BytesIO()
            context.set_spawning_popen(self)
            try:
                context.reduction.dump(prep, payload)
                context.reduction.dump(process_obj, payload)
            finally:
                context.set_spawning_popen(None)
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            try:
                cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
                self._fds.extend([child_r, child_w])
                self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
                self.sentinel = parent_r
                with open(parent_w, "wb", closefd=False) as f:
                    f.write(payload.getbuffer())
            finally:
                self.finalizer = util.Finalize(self, util.close_fds, (parent_r, parent_w))
                os.close(child_r)
                os.close(child_w)

    return LeanPopen


_POPEN = _lean_popen()


class LeanProcess(context.SpawnProcess):
    """A spawn process launched by LeanPopen (module level: the child unpickles it)."""

    @staticmethod
    def _Popen(process_obj):
        return _POPEN(process_obj)


class LeanContext(context.SpawnContext):
    Process = LeanProcess


def get_context() -> mp.context.BaseContext:
    """A context for ProcessPoolExecutor(mp_context=...): spawn, without the main module."""
    if _POPEN is None:  # pragma: no cover - another platform or Python
        return mp.get_context("spawn")
    return LeanContext()
