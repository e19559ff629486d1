"""The mixture spec: which sources, in what proportions (possibly scheduled over steps), and how
each step is shaped, packed and balanced. Pure data plus validation; it reads TOML but opens no
data file. Every error names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slipstream.configfile import apply_overrides, build_config, load_toml

FORMATS = ("text", "jsonl", "parquet")  # one file each in slipstream/data/sources/
BALANCE_METHODS = ("none", "random", "greedy", "kk")
# 12 layers x 768 / (85M weights + a 50k x 768 output projection): GPT-2 small.
DEFAULT_ATTENTION_COST = 12 * 768 / (85_000_000 + 50_257 * 768)
POOL_KINDS = ("thread", "process")
BACKEND_KINDS = ("local", "ray", "inline")
ON_ERROR = ("skip", "raise")


@dataclass(kw_only=True, slots=True, frozen=True)
class WeightSchedule:
    """A weight that changes with the step: (step, weight) points, linear in between and
    constant before the first and after the last point."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("schedule: needs at least one [step, weight] point")
        steps = [s for s, _ in self.points]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"schedule: steps must be strictly increasing, got {steps}")
        for s, w in self.points:
            if s < 0 or w < 0:
                raise ValueError(
                    f"schedule: point [{s}, {w}] is negative; steps and weights are >= 0"
                )

    @classmethod
    def from_raw(cls, raw: Any, where: str) -> WeightSchedule:
        """From a list of [step, weight] pairs, as written in TOML."""
        try:
            points = tuple((int(s), float(w)) for s, w in raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: expected a list of [step, weight] pairs, got {raw!r}"
            ) from None
        return cls(points=points)

    def weight_at(self, step: int) -> float:
        pts = self.points
        if step <= pts[0][0]:
            return float(pts[0][1])
        for (s0, w0), (s1, w1) in zip(pts, pts[1:], strict=False):
            if step <= s1:
                return float(w0 + (w1 - w0) * (step - s0) / (s1 - s0))
        return float(pts[-1][1])


@dataclass(kw_only=True, slots=True, frozen=True)
class SourceSpec:
    """One source of documents."""

    name: str
    """Unique name; checkpoints key per-source cursors by it."""
    paths: list[str]
    """Files, folders or glob patterns; relative paths are relative to the spec file. A
    folder stands for the files of the format in it and below it (jsonl: .jsonl, .jsonl.gz,
    .jsonl.zst, .ndjson; text: .txt, .md, .rst, .text, .txt.gz, .txt.zst; parquet: .parquet)."""
    format: str = "jsonl"
    """`text` (a document per file, or split on `separator`), `jsonl` or `parquet`."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet) holding the document text."""
    separator: str | None = None
    """For `text`: split each file into documents on this string; None = one document per file."""
    weight: float | None = None
    """Constant mixture weight (relative; weights are normalized). Give this or `schedule`."""
    schedule: WeightSchedule | None = None
    """Weight as a function of the step, for curricula."""
    on_error: str = "skip"
    """A corrupt jsonl line or parquet file: `skip` (and count) or `raise`."""
    max_bad_fraction: float = 0.05
    """With `skip`: the largest share of the source's records that may be corrupt; past it
    the run stops and names the first one (a wrong text_field or format looks like this)."""
    transform: str | None = None
    """Per-document preprocessing run inside the loaders before tokenizing: `module:function`
    taking and returning a str (cleanup, normalization, filters that rewrite text)."""

    def __post_init__(self) -> None:
        where = f"sources.{self.name or '?'}"
        if not self.name:
            raise ValueError("sources: every source needs a non-empty `name`")
        if not self.paths:
            raise ValueError(f"{where}.paths: list at least one file or glob")
        if self.format not in FORMATS:
            raise ValueError(
                f"{where}.format: unknown format {self.format!r}; use one of {', '.join(FORMATS)}"
            )
        if self.on_error not in ON_ERROR:
            raise ValueError(f"{where}.on_error: use 'skip' or 'raise', not {self.on_error!r}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"{where}.max_bad_fraction: {self.max_bad_fraction} is not in [0, 1]")
        if (self.weight is None) == (self.schedule is None):
            raise ValueError(f"{where}: give exactly one of `weight` or `schedule`")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"{where}.weight: {self.weight} is negative; weights must be >= 0")
        if self.transform is not None and ":" not in self.transform:
            raise ValueError(f"{where}.transform: {self.transform!r} is not 'module:function'")
        if self.separator == "":
            raise ValueError(f"{where}.separator: must be non-empty (omit it for one doc per file)")

    @classmethod
    def from_raw(cls, raw: Any, where: str) -> SourceSpec:
        """From a TOML table; `paths` may be a single string."""
        if isinstance(raw, dict) and isinstance(raw.get("paths"), str):
            raw = {**raw, "paths": [raw["paths"]]}
        return build_config(cls, raw, f"{where} ({raw.get('name', '?')})")

    def weight_at(self, step: int) -> float:
        if self.schedule is not None:
            return self.schedule.weight_at(step)
        assert self.weight is not None
        return float(self.weight)


@dataclass(kw_only=True, slots=True, frozen=True)
class BalanceSpec:
    """How rows are assigned to data-parallel ranks and micro-batches.

    The cost of a row is `linear_cost * tokens + attention_cost * sum(doc_len**2)`: attention
    runs per document under document masking, so its work grows with each document's square.
    In training, `attention_cost` comes from the model (its layers and width against its
    weights' FLOPs per token) unless set here.
    """

    method: str = "greedy"
    """`none` (rows in packing order), `random` (a seeded shuffle: no balancing, without the
    packing order's bias), `greedy` (longest processing time first) or `kk` (Karmarkar-Karp
    largest differencing, equal-size parts)."""
    linear_cost: float = 1.0
    """Cost per token of the parts that scale linearly (MLP, projections)."""
    attention_cost: float | None = None
    """Cost per squared document token relative to `linear_cost`: causal attention does about
    6 * layers * width FLOPs per squared token, the weights 6 * params per token, so
    layers * width / params. None = the trainer's model's value; outside training, a 12-layer,
    768-wide GPT-2-small's (DEFAULT_ATTENTION_COST)."""

    def __post_init__(self) -> None:
        if self.method not in BALANCE_METHODS:
            raise ValueError(
                f"balance.method: unknown {self.method!r}; use one of {', '.join(BALANCE_METHODS)}"
            )
        if self.linear_cost < 0 or (self.attention_cost or 0) < 0:
            raise ValueError("balance: linear_cost and attention_cost must be >= 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class BackendSpec:
    """Where source loaders run. The stream does not depend on any of these settings."""

    kind: str = "local"
    """`local`: a pool inside this process; `ray`: each source's loaders are Ray actors shared
    by every rank of the job; `inline`: loads in the caller's thread (tests, debugging)."""
    pool: str = "thread"
    """`thread` or `process` (for Python-heavy preprocessing); local only."""
    num_workers: int = 2
    """Loader workers in the pool (local), and load tasks per source per step (local and
    inline; Ray sends one request per source and replica)."""
    prefetch_steps: int = 4
    """Steps planned and loaded ahead of the consumer."""
    ray_address: str = ""
    """ray: the cluster to join (`auto`, `ray://host:10001`, ...); empty = the one this process
    is already connected to, else $RAY_ADDRESS, else a local Ray started for the job."""
    connect_timeout_s: float = 10.0
    """ray: how long the cluster at `ray_address` has to answer before the run stops, naming
    the address (Ray itself would retry for over a minute)."""
    job: str = ""
    """ray: the name under which the job's loader actors are found by every rank; empty =
    derived from torchrun's run id (or this process) and the spec. local: names the job's
    steps in a machine's shared store (`machine_ranks`)."""
    replicas: int = 1
    """ray: loader actors per source at the start (the autoscaler moves it). With more
    sources than `cpu_budget` allows, light sources start on shared actors."""
    shadow: int = 1
    """ray: idle hot-standby actors, each holding every source's loaders, that take over a
    failed actor's requests (whatever its source)."""
    cpu_budget: int = 0
    """ray: loader actors in all sources together, shadows aside; 0 = the cluster's CPUs."""
    autoscale_every: int = 10
    """ray: steps between replica re-evaluations (0 = fixed replicas)."""
    lookahead_steps: int = 50
    """ray: how far ahead on the weight schedule replicas are sized for."""
    machine_ranks: int = 0
    """local and ray: consecutive data-parallel ranks that share a machine and fetch each step
    together, through shared memory (`backends/machine_group.py`): local, the steps are dealt round
    them and each step is loaded by one of them for all; ray, the first to get there fetches
    for all. 0 = from torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE, 1 = every rank alone."""

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise ValueError(
                f"backend.kind: {self.kind!r} is not available; use one of {BACKEND_KINDS}"
            )
        if self.pool not in POOL_KINDS:
            raise ValueError(f"backend.pool: use 'thread' or 'process', not {self.pool!r}")
        if self.num_workers < 1:
            raise ValueError(f"backend.num_workers: {self.num_workers} must be >= 1")
        if self.prefetch_steps < 1:
            raise ValueError(f"backend.prefetch_steps: {self.prefetch_steps} must be >= 1")
        if self.replicas < 1 or self.shadow < 0 or self.cpu_budget < 0:
            raise ValueError("backend: replicas must be >= 1, shadow and cpu_budget >= 0")
        if not self.connect_timeout_s > 0:
            raise ValueError(
                f"backend.connect_timeout_s: {self.connect_timeout_s} must be > 0 (seconds)"
            )
        if self.autoscale_every < 0 or self.lookahead_steps < 0 or self.machine_ranks < 0:
            raise ValueError(
                "backend: autoscale_every, lookahead_steps and machine_ranks must be >= 0"
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class MixtureSpec:
    """A whole data plane: sources, step shape, packing, balance, backend."""

    sources: list[SourceSpec] = field(default_factory=list)
    seq_len: int = 512
    """Tokens per row."""
    micro_batch_size: int = 4
    """Rows per micro-batch."""
    num_micro_batches: int = 1
    """Micro-batches per step per rank (gradient accumulation)."""
    seed: int = 0
    """Seeds the data order (the documents each step draws, the holdout split)."""
    tokenizer: str = "byte"
    """`byte`, or the path of a Hugging Face `tokenizers` JSON file (`model` in a recipe: a
    Hugging Face model's own tokenizer)."""
    mix_by: str = "documents"
    """What the weights apportion: `documents` (a weight of 0.4 = 40% of documents) or
    `tokens` (40% of tokens, whatever the sources' document lengths)."""
    packing: bool = True
    """Pack several documents per row (best fit); off = one document piece per row, padded."""
    holdout_fraction: float = 0.0
    """Share of each source's documents held out for evaluation (a fixed split by name, the
    same for every seed); training never sees them. Which side a loader draws from is an
    argument of the loader (`split=`), not of the spec."""
    balance: BalanceSpec = field(default_factory=BalanceSpec)
    backend: BackendSpec = field(default_factory=BackendSpec)
    base_dir: str = "."
    """Directory that relative paths are resolved against (the spec file's directory)."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: the mixture lists no source; add a [[sources]] table")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, got {names}")
        for key in ("seq_len", "micro_batch_size", "num_micro_batches"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: {getattr(self, key)!r} must be a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len: {self.seq_len} is too short; a row needs >= 2 tokens")
        if self.mix_by not in ("documents", "tokens"):
            raise ValueError(f"mix_by: use 'documents' or 'tokens', not {self.mix_by!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction: {self.holdout_fraction} must be in [0, 1)")
        if all(s.schedule is None and s.weight == 0 for s in self.sources):
            raise ValueError("sources: every weight is 0; give at least one source a weight > 0")

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch_size * self.num_micro_batches

    def rows_per_step(self, dp_world_size: int) -> int:
        return self.rows_per_rank * dp_world_size

    def weights_at(self, step: int) -> list[float]:
        """Normalized weights in force at `step`."""
        raw = [s.weight_at(step) for s in self.sources]
        total = sum(raw)
        if total <= 0:
            raise ValueError(f"sources: all weights are 0 at step {step}; fix the schedules")
        return [w / total for w in raw]

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str = ".") -> MixtureSpec:
        if isinstance(raw, dict) and "dp_world_size" in raw:
            raise ValueError(
                "dp_world_size: the spec no longer holds the number of ranks; training uses "
                "the process count, and `slipstream data preview` takes --ranks N"
            )
        return build_config(cls, {"base_dir": base_dir, **raw}, "data")

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] = ()) -> MixtureSpec:
        """Load a spec file; `overrides` are `key=value` strings (`balance.method=kk`)."""
        raw = apply_overrides(load_toml(path), list(overrides))
        return cls.from_dict(raw, base_dir=str(Path(path).parent.resolve()))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `from_dict` turns back into an equal spec."""
        out: dict[str, Any] = {
            k: getattr(self, k) for k in ("seq_len", "micro_batch_size", "num_micro_batches")
        }
        out.update(seed=self.seed, tokenizer=self.tokenizer, packing=self.packing)
        out["mix_by"] = self.mix_by
        out["holdout_fraction"] = self.holdout_fraction
        out["base_dir"] = self.base_dir
        out["balance"] = {k: getattr(self.balance, k) for k in BalanceSpec.__dataclass_fields__}
        out["backend"] = {k: getattr(self.backend, k) for k in BackendSpec.__dataclass_fields__}
        out["sources"] = []
        for s in self.sources:
            d = {k: getattr(s, k) for k in SourceSpec.__dataclass_fields__ if k != "schedule"}
            d = {k: v for k, v in d.items() if v is not None}
            if s.schedule is not None:
                d["schedule"] = [list(p) for p in s.schedule.points]
            out["sources"].append(d)
        return out
