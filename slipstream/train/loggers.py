"""Where a run's step metrics go (`train.loggers`), on rank 0 only: metrics.jsonl always (the
run's own record: one JSON object per step, appended, flushed each step), TensorBoard event
files through torch's writer, and Weights & Biases. A resumed run continues the same records,
each step once: the rows and events past the checkpoint it resumed from (written before a
crash) are dropped, and W&B resumes the same run."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


class Loggers:
    def __init__(
        self, names: list[str], out: Path, *, start: int, config: dict, project: str, say
    ) -> None:
        if start:
            _drop_rows_past(out / "metrics.jsonl", start)
        self._jsonl = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        self._tb = self._wandb = None
        if "tensorboard" in names:
            self._tb = _tensorboard(out, start)
        if "wandb" in names:
            self._wandb = _wandb(out, start, config, project, say)

    def log(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        step = int(row["step"])
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _drop_rows_past(path: Path, step: int) -> None:
    """Rows a run wrote past the checkpoint it resumes from (it crashed after them) go: the
    steps are trained again, and each is recorded once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(keep) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _tensorboard(out: Path, start: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.loggers: 'tensorboard' needs the tensorboard package: "
            "pip install -c constraints.txt tensorboard"
        ) from None
    # purge_step: events a stopped run wrote past its checkpoint are dropped on resume.
    return SummaryWriter(out / "tensorboard", purge_step=start + 1 if start else None)


def _wandb(out: Path, start: int, config: dict, project: str, say):
    try:
        import wandb
    except ImportError:
        raise ValueError(
            "train.loggers: 'wandb' needs the wandb package: pip install -c constraints.txt wandb"
        ) from None
    id_file = out / "wandb" / "run_id"
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    run_id = id_file.read_text().strip() if start and id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    mode = os.environ.get("WANDB_MODE") or ("online" if _logged_in() else "offline")
    run = wandb.init(
        project=project,
        name=out.name,
        id=run_id,
        resume="allow",
        dir=str(out),
        config=config,
        mode=mode,
        settings=wandb.Settings(console="off", silent=True),
    )
    if mode == "offline":
        say(f"wandb: offline run in {out / 'wandb'}; upload it with `wandb sync {out / 'wandb'}`")
    return run


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
