"""Per-bucket early steps: in a step's last backward, without clipping, fp16 or the delayed
update, each bucket's host step starts as soon as its gradient is complete, in a worker thread
beside the rest of backward: the same update, bit for bit (with clipping, the scale is known
only once every bucket is in)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class EarlySteps:
    def __init__(self, step_bucket: Callable[[int, list[float]], None]) -> None:
        """step_bucket(k, lrs): the host step of bucket k at learning rates `lrs`."""
        self.step_bucket = step_bucket
        self.armed = False
        self.lrs: list[float] = []
        self._futures: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.num_steps = 0  # buckets stepped during backward, over the run

    def arm(self, lrs: list[float]) -> None:
        """Step buckets as they complete, at `lrs` (the step's learning rates)."""
        self.armed, self.lrs = True, list(lrs)

    def disarm(self) -> None:
        self.armed = False

    def bucket_ready(self, k: int) -> None:
        """Bucket k's gradient is complete in its host buffer."""
        if not self.armed:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-early-step")
        self._futures[k] = self._pool.submit(self.step_bucket, k, self.lrs)

    def join(self) -> set[int]:
        """The buckets stepped during backward (their host steps finished); disarms."""
        done = set(self._futures)
        for fut in self._futures.values():
            fut.result()
        self._futures.clear()
        self.armed = False
        self.num_steps += len(done)
        return done

    def close(self) -> None:
        self.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
