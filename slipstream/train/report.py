"""What a run tells its user beyond the step bar: what it would otherwise hide at the start
(skipped records, a peak it never reaches), the one line a survivor prints when a peer is
lost, and what the run came to (summary.json)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from slipstream.train import checkpoint as ckpt
from slipstream.train.distributed import Dist, lost_ranks


def say_resolved(console: Console, cfg, num_bad: list[int]) -> None:
    """Corrupt records skipped per source, and a warm-up longer than the run."""
    for src, n in zip(cfg.data.sources, num_bad, strict=True):
        if n:
            console.print(
                f"data: source {src.name!r}: {n:,} corrupt record(s) skipped "
                f"(on_error = {src.on_error!r}); `slipstream data preview` lists them",
                markup=False,
            )
    o, t = cfg.optim, cfg.train
    if o.warmup_steps > t.steps:
        console.print(
            f"note: optim.warmup_steps {o.warmup_steps} > train.steps {t.steps}: the "
            f"learning rate never reaches optim.lr (peak {o.lr * t.steps / o.warmup_steps:.3g})",
            markup=False,
        )


def lost_message(d: Dist, out: Path, step: int, error: RuntimeError) -> str:
    """One line of this rank's own: who was lost, when, and how to continue."""
    lost = lost_ranks(d)
    who = (
        "rank 0 (it held the job's store)" if lost is None
        else f"rank {', '.join(map(str, lost))}" if lost
        else f"a peer ({str(error).splitlines()[0][:120]})"
    )  # fmt: skip
    last = ckpt.latest_checkpoint(out)
    resume = (
        f"the last checkpoint is step {int(last.name[len(ckpt.PREFIX):])} ({last}); "
        "--resume continues from it" if last is not None
        else "no checkpoint was written yet; start the run again"
    )  # fmt: skip
    return f"rank {d.rank}: lost {who} at step {step + 1}; {resume}"


def run_summary(
    history: list[dict], step: int, num_params: int, per_rank: int | None, out: Path
) -> dict:
    """What the run came to, for scripts: summary.json."""
    evals = [r for r in history if "eval_bpb" in r]
    last = ckpt.latest_checkpoint(out)
    summary = {
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "final_eval_bpb": evals[-1]["eval_bpb"] if evals else None,
        "num_params": num_params,
        "tokens": sum(r["tokens"] for r in history),
        "wall_s": history[-1]["time/elapsed_s"] if history else 0.0,
        "metrics": str(out / "metrics.jsonl"),
        "checkpoint": str(last) if last else None,
    }
    if per_rank is not None:
        summary["num_params_per_tp_rank"] = per_rank
    return summary
