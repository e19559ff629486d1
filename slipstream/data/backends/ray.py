"""Ray backend: each source's loaders are Ray actors shared by every rank of the job, found by
name (`JobDirectory`, `SourceActor` in `ray_actors.py`). A trainer process keeps no source's
files, index or text: only the tokenizer (to decode and pad) and actor handles.

Each rank asks for the documents of its own rows; a request for document d of a source goes to
serving replica d mod R (so ranks sharing a long document hit one actor's cache). When an actor
dies, the request is issued again to the replica that took its slot (a hot standby promoted by
the directory): loaders hold no logical state, so nothing is lost or repeated. Token arrays
come back as numpy arrays through the object store (far faster there than torch tensors).

Starting: `backend.ray_address`, else $RAY_ADDRESS, else the Ray this process already joined,
else a local one (in a launched job: its rank 0 starts it, the other ranks join it).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from slipstream.data.backends.base import TokenSpan, shard_bar
from slipstream.data.sources.tokenizers import build_tokenizer
from slipstream.data.spec import MixtureSpec
from slipstream.topology import Topology

MAX_RETRIES = 5
JOIN_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0  # a cluster that is starting has this long to answer


def connect(
    address: str = "", topology: Topology | None = None, timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Join (or start) Ray for this process. In a launched job without an address, its rank 0
    starts a local Ray and leaves its address in a file named by the job's run id, where the
    other ranks read it (so they cannot join some other Ray running on the machine)."""
    topology = topology or Topology()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address, timeout_s)
        ray.init(address=address, log_to_driver=False)
        return
    run = topology.run_id
    note = Path(tempfile.gettempdir()) / f"slipstream-ray-{run}.address" if run else None
    if topology.is_main:
        # "local": always a new Ray of its own, never one found on the machine (a cluster
        # another user started, or a stale record of one that is gone).
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        if note is not None:
            tmp = note.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(ray.get_runtime_context().gcs_address)
            os.replace(tmp, note)
            atexit.register(lambda: note.unlink(missing_ok=True))
        return
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while note is not None and not note.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not start Ray within {JOIN_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    ray.init(address=note.read_text() if note is not None else "auto", log_to_driver=False)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout_s`, naming the address, when nothing answers there (Ray itself
    retries for well over a minute, printing only its own warnings). `auto` and `local` are
    Ray's to resolve."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"backend.ray_address: {address!r} is not host:port (for example "
            "'127.0.0.1:6379', or 'ray://host:10001' for a Ray client)"
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"backend.ray_address: nothing answers at {address} ({e.strerror or e}) "
                    f"after {timeout_s:.0f} s; start the cluster there (ray start --head), or "
                    "leave backend.ray_address empty for a local Ray"
                ) from None
            time.sleep(0.5)


def job_name(spec: MixtureSpec, tokenizer: str, run_id: str = "") -> str:
    if spec.backend.job:
        return spec.backend.job
    run = run_id or f"pid{os.getpid()}"
    digest = hashlib.sha1(
        json.dumps([spec.to_dict(), tokenizer], sort_keys=True, default=str).encode()
    )
    return f"{run}-{digest.hexdigest()[:10]}"


class _Load:
    """One submit: per replica a request, re-issued on failure; `result()` in the order asked.
    Sent with the other submits of its step (`RayBackend.flush`): one call per actor. With
    `spans`, each item's tokens [lo, hi) only, as `TokenSpan`s (a document may come twice, as
    two spans). Parts of a load are lists of positions in it."""

    def __init__(
        self,
        backend: RayBackend,
        source: int,
        ids: list[int],
        spans: list[tuple[int, int]] | None = None,
    ) -> None:
        self.backend, self.source, self.ids, self.spans = backend, source, ids, spans
        self.parts: list[tuple[str, list[int], object, int | None]] | None = None

    def request(self, where: list[int]) -> tuple[int, list[int], list | None]:
        """(source, document ids, their spans or None) of the items at positions `where`."""
        spans = None if self.spans is None else [self.spans[i] for i in where]
        return self.source, [self.ids[i] for i in where], spans

    def result(self) -> list:
        if self.parts is None:
            self.backend.flush()
        assert self.parts is not None
        got: dict[int, object] = {}
        parts = self.parts
        for attempt in range(MAX_RETRIES + 1):
            failed: list[int] = []
            for name, where, ref, at in parts:
                try:
                    out = ray.get(ref)
                    got.update(zip(where, self._tokens(where, out if at is None else out[at])))
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    self.backend._report_dead(name)
                    failed.extend(where)
            if not failed:
                return [got[i] for i in range(len(self.ids))]
            if attempt == MAX_RETRIES:
                break
            self.backend.num_reissued += len(failed)
            parts = [(*part, None) for part in self.backend._send(self, failed)]
        raise RuntimeError(
            f"source {self.backend.names[self.source]!r}: loader actors keep failing "
            f"({MAX_RETRIES} retries); see the Ray logs"
        )

    def _tokens(self, where: list[int], out) -> list:
        if self.spans is None:
            self.backend.tokens_received += sum(len(t) for t in out)
            return out
        lengths, data = out
        self.backend.tokens_received += sum(len(t) for t in data)
        return [
            TokenSpan(self.spans[i][0], n, t) for i, n, t in zip(where, lengths, data, strict=True)
        ]


class RayBackend:
    def __init__(
        self, spec: MixtureSpec, tokenizer: str | None = None, topology: Topology | None = None
    ) -> None:
        from slipstream.data.backends.ray_actors import NAMESPACE, JobDirectory

        topology = topology or Topology()
        connect(spec.backend.ray_address, topology, spec.backend.connect_timeout_s)
        self.spec = spec
        tok = tokenizer or spec.tokenizer
        self.tokenizer = build_tokenizer(tok, spec.base_dir)
        self.names = [s.name for s in spec.sources]
        self.job = job_name(spec, tok, topology.run_id)
        self._ns = NAMESPACE
        # Detached: it must outlive whichever rank happened to create it; the last client to
        # detach takes it down (a crashed job's directory goes with its Ray). A client that
        # attaches just as the last one leaves finds it gone: it starts a new one.
        for attempt in range(MAX_RETRIES + 1):
            self.directory = JobDirectory.options(
                name=f"{self.job}:directory",
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
            ).remote(self.job, spec.to_dict(), tok)
            try:
                ray.get(self.directory.attach.remote())
                break
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                if attempt == MAX_RETRIES:
                    raise
                time.sleep(0.5)
        self._version, self._layout = ray.get(self.directory.get.remote())
        self._handles: dict[str, object] = {}
        metas = [self._ask(s, "meta") for s in range(len(self.names))]
        self.num_docs = [m[0] for m in metas]
        self.num_bad = [m[1] for m in metas]
        self._num_shards = [m[2] for m in metas]
        self.num_loaded = [0] * len(self.names)
        self.num_reissued = 0
        self.tokens_received = 0  # what came through the object store (spans: rows' tokens)
        self._queued: list[_Load] = []

    # -- the layout -----------------------------------------------------------------------------
    def _actor(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=self._ns)
        return handle

    def _report_dead(self, name: str) -> None:
        self._handles.pop(name, None)
        self._version, self._layout = ray.get(self.directory.report_dead.remote(name))

    def refresh(self) -> None:
        """Take the directory's current layout (after autoscaling)."""
        self._version, self._layout = ray.get(self.directory.get.remote())

    def autoscale(self, step: int) -> None:
        """Ask the directory to size replicas for the schedule ahead of `step` (owner rank)."""
        self._version, self._layout = ray.get(self.directory.autoscale.remote(step))

    def replicas(self) -> list[int]:
        return [len(self._layout[s]["serving"]) for s in range(len(self.names))]

    def upkeep(self, step: int, owner: bool) -> None:
        """The owner has the replicas sized for the schedule ahead; the others take the
        directory's layout."""
        if owner:
            self.autoscale(step)
        else:
            self.refresh()

    def _send(self, load: _Load, where: list[int]) -> list[tuple[str, list[int], object]]:
        """Issue the items of `load` at positions `where` again, alone (after a failure)."""
        parts = []
        for name, part in self._route(load, where).items():
            try:
                ref = self._actor(name).get_many.remote(*load.request(part))
            except ValueError:
                # The name is gone: removed by the autoscaler (the directory no longer lists
                # it) or dead (the directory replaces it now). Either way, the new layout.
                self._report_dead(name)
                return self._send(load, where)
            parts.append((name, part, ref))
        return parts

    def _route(self, load: _Load, where: list[int]) -> dict[str, list[int]]:
        """Positions of `load` by serving actor: document d to replica d mod R."""
        serving = self._layout[load.source]["serving"]
        by_name: dict[str, list[int]] = {}
        for i in where:
            by_name.setdefault(serving[load.ids[i] % len(serving)], []).append(i)
        return by_name

    # -- the Backend protocol --------------------------------------------------------------------
    def submit(self, source: int, ids: list[int]) -> _Load:
        """Queued until `flush()` (or its first `result()`), so a step's loads of several
        sources go to each actor in one call (a Ray call costs ~1 ms of CPU either side)."""
        return self.submit_spans(source, ids, None)

    sends_spans = True  # the loader asks for runs of tokens, not whole documents
    shares_docs = False  # a document always goes to one actor, which keeps recent ones

    def submit_spans(
        self,
        source: int,
        ids: list[int],
        spans: list[tuple[int, int]] | None,
        shared: frozenset[int] | set[int] = frozenset(),
    ) -> _Load:
        """`submit` for tokens [lo, hi) of each document only (`TokenSpan`s): a rank receives
        the tokens its rows hold, not every whole document they touch. `shared` is not needed
        here: a document always goes to the same actor, which keeps recent ones."""
        self.num_loaded[source] += len(ids)
        load = _Load(self, source, list(ids), spans)
        self._queued.append(load)
        return load

    def flush(self) -> None:
        """Send the queued loads: per actor, one call for all the sources it serves."""
        queued, self._queued = self._queued, []
        while queued:
            calls: dict[str, list[tuple[list[int], _Load]]] = {}
            for load in queued:
                for name, part in self._route(load, list(range(len(load.ids)))).items():
                    calls.setdefault(name, []).append((part, load))
            handles = {}
            for name in calls:
                try:
                    handles[name] = self._actor(name)
                except ValueError:  # gone (removed or dead): route again on the new layout
                    self._report_dead(name)
                    break
            else:
                for load in queued:
                    load.parts = []
                for name, items in calls.items():
                    requests = [load.request(part) for part, load in items]
                    ref = handles[name].get_sources.remote(requests)
                    for at, (part, load) in enumerate(items):
                        load.parts.append((name, part, ref, at))
                return

    def lengths(self) -> list[np.ndarray]:
        out = []
        with shard_bar(sum(self._num_shards)) as advance:
            for s, n in enumerate(self._num_shards):
                parts = []
                for i in range(n):
                    parts.append(self._ask(s, "shard_lengths", i))
                    advance()
                out.append(np.concatenate(parts))
        return out

    def _ask(self, source: int, method: str, *args):
        """One call to one of the source's serving actors, failing over like loads do."""
        for _ in range(MAX_RETRIES + 1):
            name = self._layout[source]["serving"][0]
            try:
                return ray.get(getattr(self._actor(name), method).remote(source, *args))
            except (ValueError, RayActorError, ActorDiedError, ActorUnavailableError):
                self._report_dead(name)
        raise RuntimeError(f"source {self.names[source]!r}: loader actors keep failing")

    @property
    def busy_s(self) -> list[float]:
        """The job's loader actors' CPU seconds per source, every rank's loads together (a
        call to each actor: read it now and then, not per step)."""
        out = [0.0] * len(self.names)
        for stats in self.actor_stats().values():
            for s, seconds in stats["busy_by_source"].items():
                out[int(s)] += seconds
        return out

    cpu_s = busy_s  # the actors count CPU seconds only

    def actor_stats(self) -> dict[str, dict]:
        """Every serving and standby actor's counters (documents tokenized, cache hits, busy
        seconds, process id), by name."""
        names = {n for lay in self._layout.values() for n in lay["serving"] + lay["shadows"]}
        out = {}
        for n in names:
            try:
                out[n] = ray.get(self._actor(n).stats.remote())
            except Exception:  # noqa: BLE001 - a dead actor reports nothing
                continue
        return out

    def close(self) -> None:
        if self.directory is None:
            return
        with contextlib.suppress(Exception):  # the actor exits inside the call; Ray may be down
            ray.get(self.directory.detach.remote())
        self.directory = None
