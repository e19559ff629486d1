"""The Ray actors of the `ray` backend: loaders (`SourceActor`: one source's, a few light
sources' together, or, as a hot standby, every source's) and the job's directory
(`JobDirectory`), which knows which actors serve each source, starts no more serving actors
than the CPU budget holds, promotes a standby when an actor fails, and sizes each source's
replicas from its measured cost and its weight ahead on the schedule. Imported only where Ray
is installed."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import OrderedDict

import numpy as np
import ray

from slipstream.data.sources.loader import SourceLoader
from slipstream.data.sources.tokenizers import build_tokenizer, one_thread_tokenizer
from slipstream.data.spec import MixtureSpec

NAMESPACE = "slipstream"
CACHE_DOCS = 4096
"""Documents each loader keeps after tokenizing them: requests for one document are routed to
one actor, so ranks whose rows share a long document find it tokenized once."""


@ray.remote(num_cpus=0, max_restarts=0)
class SourceActor:
    """Loaders of one source (a serving replica) or of every source (a hot standby, which
    can take over from any source's failed replica): documents by id, tokenized, as numpy
    arrays (through the object store). Holds files, indexes and the tokenizer, never the
    stream's state: any replica can serve any request, and a failed request is simply issued
    again elsewhere."""

    def __init__(self, spec_dict: dict, tokenizer: str, sources: list[int]) -> None:
        one_thread_tokenizer()
        spec = MixtureSpec.from_dict(spec_dict)
        tok = build_tokenizer(tokenizer, spec.base_dir)  # one tokenizer for all its sources
        self.loaders = {s: SourceLoader(spec.sources[s], tok, spec.resolve) for s in sources}
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.num_tokenized = dict.fromkeys(sources, 0)
        self.busy_s = dict.fromkeys(sources, 0.0)
        self.num_hits = 0
        self.num_calls = 0  # load requests received (a rank sends one per actor and step)

    def meta(self, source: int) -> tuple[int, int, int]:
        ldr = self.loaders[source]
        return ldr.num_docs, ldr.num_bad, len(ldr.shards)

    def shard_lengths(self, source: int, shard: int) -> np.ndarray:
        return self.loaders[source].shard_lengths(shard)

    def get_many(
        self, source: int, ids: list[int], spans: list[tuple[int, int]] | None = None
    ) -> list[np.ndarray] | tuple[list[int], list[np.ndarray]]:
        """The documents' token arrays; with `spans`, (their lengths, tokens [lo, hi) of
        each): only what the asking rank's rows hold travels."""
        self.num_calls += 1
        return self._get_spans(source, ids, spans)

    def get_sources(self, requests: list[tuple[int, list[int], list | None]]) -> list:
        """`get_many` of several sources in one call: per (source, ids, spans), its result."""
        self.num_calls += 1
        return [self._get_spans(source, ids, spans) for source, ids, spans in requests]

    def _get_spans(self, source: int, ids: list[int], spans: list | None):
        tokens = self._get(source, ids)
        if spans is None:
            return tokens
        return [len(t) for t in tokens], [t[lo:hi] for t, (lo, hi) in zip(tokens, spans)]

    def _get(self, source: int, ids: list[int]) -> list[np.ndarray]:
        # CPU seconds of this actor's process, not wall-clock: a source's cost must not
        # depend on what else shares the machine's cores (the autoscaler compares them).
        t0 = time.process_time()
        missing = [d for d in dict.fromkeys(ids) if (source, d) not in self.cache]
        loaded = self.loaders[source].get_many(missing) if missing else []
        for d, tokens in zip(missing, loaded):
            self.cache[(source, d)] = tokens
        self.num_tokenized[source] += len(missing)
        self.num_hits += len(ids) - len(missing)
        out = []
        for d in ids:
            self.cache.move_to_end((source, d))
            out.append(self.cache[(source, d)])
        while len(self.cache) > CACHE_DOCS:
            self.cache.popitem(last=False)
        self.busy_s[source] += time.process_time() - t0
        return out

    def stats(self) -> dict:
        return {
            "tokenized": sum(self.num_tokenized.values()),
            "tokenized_by_source": dict(self.num_tokenized),
            "busy_by_source": dict(self.busy_s),
            "hits": self.num_hits,
            "calls": self.num_calls,
            "pid": os.getpid(),
            "tokenizer_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
        }


REGROUP_GAIN = 0.1  # a new grouping of sources must lower the heaviest actor's load this much
MIN_COST_DOCS = 3  # documents per source measured before sources are regrouped by cost


def _cost_per_doc(measured: np.ndarray) -> list[float]:
    """Seconds per document per source from (busy seconds, documents); the median of the
    known ones where a source has none measured yet."""
    out = [busy / docs if docs else math.nan for busy, docs in measured]
    known = [c for c in out if not math.isnan(c)]
    default = float(np.median(known)) if known else 1.0
    return [default if math.isnan(c) else c for c in out]


def _deal(loads, slots: int) -> list[list[int]]:
    """Sources dealt to at most `slots` groups: the heaviest first, each to the lightest group."""
    groups: list[list[int]] = [[] for _ in range(slots)]
    total = np.zeros(slots)
    for s in np.argsort(-np.asarray(loads, dtype=np.float64), kind="stable").tolist():
        g = int(np.argmin(total))
        groups[g].append(s)
        total[g] += loads[s]
    return [sorted(g) for g in groups if g]


@ray.remote(num_cpus=0, max_restarts=0)
class JobDirectory:
    """Which actors serve each source (`serving`, requests routed by document id) and which
    wait as hot standbys (`shadows`: the same processes for every source); a version that
    changes with the layout."""

    def __init__(self, job: str, spec_dict: dict, tokenizer: str) -> None:
        self.job, self.spec_dict, self.tokenizer = job, spec_dict, tokenizer
        self.spec = MixtureSpec.from_dict(spec_dict)
        b = self.spec.backend
        n = len(self.spec.sources)
        self.handles: dict[str, object] = {}
        self.next_index = [0] * n
        self.next_standby = 0
        # Hot standbys hold every source's loaders, so `shadow` processes cover all sources
        # (one per source each would cost a process per source).
        standbys = [self._new_standby() for _ in range(b.shadow)]
        self.layout = {s: {"serving": [], "shadows": list(standbys)} for s in range(n)}
        for group in self._groups():
            for _ in range(b.replicas):
                name = self._new_group(group)
                for s in group:
                    self.layout[s]["serving"].append(name)
        self.version = 0
        self.events: list[str] = []
        # Measured (busy seconds, documents) per source of actors no longer serving it: a
        # regrouping must not forget the costs it was based on.
        self.retired = np.zeros((n, 2))
        self.clients = 0

    def attach(self) -> None:
        self.clients += 1

    def detach(self) -> bool:
        """A client is done; the last one takes the job's actors down (and this directory,
        which outlives whichever rank created it). Returns True when that happened."""
        self.clients -= 1
        if self.clients > 0:
            return False
        self.shutdown()
        ray.actor.exit_actor()
        return True

    def _new(self, s: int) -> str:
        name = f"{self.job}:{self.spec.sources[s].name}:{self.next_index[s]}"
        self.next_index[s] += 1
        return self._start(name, [s])

    def _budget(self) -> int:
        b = self.spec.backend
        return b.cpu_budget or int(ray.cluster_resources().get("CPU", len(self.spec.sources)))

    def _groups(self) -> list[list[int]]:
        """Sources that start on a shared actor: no more serving processes than the CPU
        budget holds (an actor uses one CPU at most; more processes would cost memory, not
        speed). The heaviest sources are dealt first, each to the lightest group; the
        autoscaler later regroups them by measured cost, or, when the budget has room for a
        process per source, gives a source that needs it actors of its own."""
        b, n = self.spec.backend, len(self.spec.sources)
        slots = max(1, self._budget() // b.replicas)
        if n <= slots:
            return [[s] for s in range(n)]
        weights = np.max([self.spec.weights_at(t) for t in range(b.lookahead_steps + 1)], axis=0)
        return _deal(weights, slots)

    def _new_group(self, sources: list[int]) -> str:
        if len(sources) == 1:
            return self._new(sources[0])
        name = f"{self.job}:shared:{'+'.join(str(s) for s in sources)}:{self.next_standby}"
        self.next_standby += 1
        return self._start(name, sources)

    def _new_standby(self) -> str:
        name = f"{self.job}:standby:{self.next_standby}"
        self.next_standby += 1
        return self._start(name, list(range(len(self.spec.sources))))

    def _start(self, name: str, sources: list[int]) -> str:
        # The directory owns its actors: it keeps the handles (an actor nobody holds is gone).
        self.handles[name] = SourceActor.options(
            name=name, namespace=NAMESPACE, get_if_exists=True
        ).remote(self.spec_dict, self.tokenizer, sources)
        return name

    def get(self) -> tuple[int, dict]:
        return self.version, self.layout

    def report_dead(self, name: str) -> tuple[int, dict]:
        """A client saw `name` fail. A failed serving actor's routing slots (in every source
        it served) go to a standby, which then serves those sources only; a new standby for
        every source is started behind it (and behind a failed standby). Idempotent: later
        reports of the same actor find it already replaced."""
        slots = [(s, lay["serving"].index(name)) for s, lay in self.layout.items()
                 if name in lay["serving"]]  # fmt: skip
        if slots:
            shadows = self.layout[slots[0][0]]["shadows"]
            if shadows:
                new = self._retire_standby(shadows[0])
            else:
                new = self._new_group([s for s, _ in slots])
            for s, i in slots:
                self.layout[s]["serving"][i] = new
            self._record(f"{name} failed; {new} took over")
            return self.version, self.layout
        if any(name in lay["shadows"] for lay in self.layout.values()):
            self._retire_standby(name)
            self._record(f"standby {name} failed; replaced")
        return self.version, self.layout

    def _retire_standby(self, name: str) -> str:
        """`name` stops standing by for every source; a fresh standby takes its place."""
        fresh = self._new_standby()
        for lay in self.layout.values():
            lay["shadows"] = [fresh if x == name else x for x in lay["shadows"]]
        return name

    def _record(self, event: str) -> None:
        self.version += 1
        self.events.append(event)

    def autoscale(self, step: int) -> tuple[int, dict]:
        """Replicas per source in proportion to (measured seconds per document) x (the
        largest weight it will have in the next lookahead_steps steps), at least one each,
        within the CPU budget. New actors start before the weight rises; removed ones go
        once clients have the new layout (they fail over if they still call one)."""
        b, n = self.spec.backend, len(self.spec.sources)
        measured = self._measured()  # one round of stats calls per autoscale
        cost = _cost_per_doc(measured)
        ahead = range(step, step + b.lookahead_steps + 1, max(1, b.lookahead_steps // 10))
        weights = np.max([self.spec.weights_at(t) for t in ahead], axis=0)
        load = np.array([cost[s] * weights[s] for s in range(n)])
        budget = self._budget()
        if n > budget:  # fewer CPUs than sources: one actor per group of sources
            return self._regroup(load, budget, step, measured[:, 1])
        want = np.maximum(1, np.floor(load / max(load.sum(), 1e-12) * budget)).astype(int)
        while want.sum() > budget:
            want[int(np.argmax(want))] -= 1
        changed = False
        for s in range(n):
            serving = self.layout[s]["serving"]
            while len(serving) < want[s]:
                serving.append(self._new(s))
                changed = True
            while len(serving) > want[s]:
                name = serving.pop()
                if not any(name in lay["serving"] for lay in self.layout.values()):
                    ray.kill(self.handles.pop(name))  # no other source is served by it
                changed = True
        if changed:
            self.version += 1
            self.events.append(f"step {step}: replicas {want.tolist()}")
        return self.version, self.layout

    def _regroup(
        self, load: np.ndarray, slots: int, step: int, docs: np.ndarray
    ) -> tuple[int, dict]:
        """Sources dealt to `slots` shared actors by measured load (cost x weight ahead). A new
        grouping replaces the current one only if it lowers the heaviest actor's load by
        REGROUP_GAIN: new actors start with empty caches and fresh cost estimates, and
        regrouping on noise would churn them. `docs`: documents measured per source."""
        n = len(self.spec.sources)
        current: dict[str, set[int]] = {}
        for s in range(n):
            for name in self.layout[s]["serving"]:
                current.setdefault(name, set()).add(s)
        within = len(current) <= slots
        if within and docs.min() < MIN_COST_DOCS:
            return self.version, self.layout  # a source's cost is not known well enough yet
        groups = _deal(load, slots)
        heaviest = max(sum(load[s] for s in g) for g in groups)
        now = max(sum(load[s] for s in g) / len(self.layout[min(g)]["serving"])
                  for g in current.values())  # fmt: skip
        if within and heaviest > now * (1 - REGROUP_GAIN):
            return self.version, self.layout
        by_sources = {frozenset(v): k for k, v in current.items()}
        serving, keep = {}, set()
        for g in groups:
            name = by_sources.get(frozenset(g)) or self._new_group(g)
            keep.add(name)
            for s in g:
                serving[s] = [name]
        for name, sources in current.items():
            if name not in keep:
                try:  # what it measured stays in the costs
                    x = ray.get(self.handles[name].stats.remote())
                    for s in sources:
                        self.retired[s] += (x["busy_by_source"].get(s, 0.0),
                                            x["tokenized_by_source"].get(s, 0))  # fmt: skip
                except Exception:  # noqa: BLE001 - a dead actor has no stats
                    pass
                ray.kill(self.handles.pop(name))  # clients that still call it fail over
        for s in range(n):
            self.layout[s]["serving"] = serving[s]
        self._record(f"step {step}: sources grouped {groups} on {len(groups)} actors")
        return self.version, self.layout

    def _measured(self) -> np.ndarray:
        """(busy seconds, documents tokenized) per source, over every actor that served it."""
        out = self.retired.copy()
        for s in range(len(self.spec.sources)):
            for name in self.layout[s]["serving"]:
                try:
                    x = ray.get(self.handles[name].stats.remote())
                except Exception:  # noqa: BLE001 - a dead actor has no stats; failover handles it
                    continue
                out[s] += (x["busy_by_source"].get(s, 0.0), x["tokenized_by_source"].get(s, 0))
        return out

    def history(self) -> list[str]:
        return list(self.events)

    def shutdown(self) -> None:
        names = {n for lay in self.layout.values() for n in lay["serving"] + lay["shadows"]}
        for name in names:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(self.handles.pop(name))
