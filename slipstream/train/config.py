"""TrainConfig: the run's length, evaluation, checkpoints, device and precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LOGGERS = ("jsonl", "tensorboard", "wandb")


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    """The run: length, evaluation, checkpoints, device and precision."""

    steps: int = 100
    """Total optimizer steps; the learning-rate schedule spans them."""
    stop_at_step: int = 0
    """End this run after this step (0 = train.steps), with a checkpoint there; for jobs in
    time-limited slots. Continue with --resume."""
    out_dir: str = ""
    """Metrics, the resolved config and checkpoints go here (relative to the working dir);
    empty: `runs/<the recipe's name>`. A folder that holds a run is trained into again only
    with --resume (continue it) or --overwrite (replace it)."""
    seed: int = 0
    """Seeds the model's initialization (the data order has its own seed, data.seed)."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on CUDA with bf16, fp32 elsewhere), `fp32` or `bf16`."""
    num_threads: int = 0
    """torch CPU threads per process; 0 = torch's default (torchrun sets 1 per process)."""
    eval_every: int = 50
    """Evaluate on held-out documents every N steps (0 = never); needs data.holdout_fraction."""
    eval_steps: int = 2
    """Held-out steps per evaluation (the same ones each time)."""
    log_every: int = 10
    """Print a line every N steps when the output is not a terminal."""
    checkpoint_every: int = 50
    """Checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """The newest checkpoints kept (older ones are removed as new ones are written)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["def "])
    """Prompts sampled from at the end of the run, one sample each."""
    sample_tokens: int = 120
    """Tokens generated per prompt at the end (0 = no sample)."""
    progress: bool = True
    """A live bar on a terminal (lines every log_every steps elsewhere); false: lines only."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where the step metrics go: `jsonl` (metrics.jsonl in out_dir: always written, the run's
    own record), `tensorboard` (event files in out_dir/tensorboard) and `wandb` (Weights &
    Biases, in out_dir/wandb; offline unless you are logged in or WANDB_MODE says)."""
    wandb_project: str = "slipstream"
    """The Weights & Biases project a `wandb` logger's run goes to."""
    trace_steps: int = 0
    """Steps recorded by torch.profiler after the first two, into
    out_dir/profile/trace-rank-R.json (Chrome trace format: open it in Perfetto), with the
    step's phases as ranges; 0 = none. `slipstream doctor` asks for 3. (Every run records
    its phases per step and rank in out_dir/profile/rank-R.json, at a few floats a step.)"""

    def __post_init__(self) -> None:
        unknown = [n for n in self.loggers if n not in LOGGERS]
        if unknown:
            raise ValueError(
                f"train.loggers: {', '.join(map(repr, unknown))} unknown; use any of "
                f"{', '.join(LOGGERS)}"
            )
        if self.steps <= 0:
            raise ValueError(f"train.steps: {self.steps} must be > 0")
        if not 0 <= self.stop_at_step <= self.steps:
            raise ValueError(f"train.stop_at_step: {self.stop_at_step} must be in [0, steps]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision: {self.precision!r}; use auto, fp32 or bf16")
        if self.keep_checkpoints < 1:
            raise ValueError("train.keep_checkpoints: keep at least 1")
        for key in (
            "eval_every",
            "eval_steps",
            "log_every",
            "checkpoint_every",
            "num_threads",
            "trace_steps",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)
