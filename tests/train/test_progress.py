"""The live bar stays one line of at most 80 columns, also with an evaluation, MFU and Ray's
loader counts; an evaluation gets a line of its own above it."""

from __future__ import annotations

from rich.console import Console

from slipstream.train.config import TrainConfig
from slipstream.train.progress import Progress

ROW = {
    "step": 1200,
    "loss": 5.51561,
    "tokens_per_s": 123_456.0,
    "time/data_wait_s": 0.01,
    "time/step_s": 0.1,
    "data/replicas/code": 3.0,
    "data/replicas/prose": 12.0,
    "eval_loss": 5.4321,
    "eval_bpb": 2.7401,
}


def test_the_bar_fits_80_columns_with_an_evaluation():
    console = Console(width=80, force_terminal=True, record=True, color_system=None)
    progress = Progress(console, TrainConfig(steps=100_000), start=0, enabled=True,
                        flops_per_token=0.0, world_size=1)  # fmt: skip
    progress.mfu_scale = 1e-6  # as on a GPU: the MFU field shown too
    with progress:
        progress.update(ROW)
    assert "step 1200: eval loss 5.4321 (2.740 bits/byte)" in console.export_text()
    alone = Console(width=80, force_terminal=True, record=True, color_system=None)
    alone.print(progress.bar.get_renderable())
    (line,) = [x for x in alone.export_text().splitlines() if x.strip()]
    assert len(line) <= 80 and "1200/100000" in line and "…" not in line, line  # not squeezed
    assert line.split("1200/100000")[1].split()[:8] == [
        "loss",
        "5.5156",
        "123k",
        "tok/s",
        "wait",
        "10%",
        "MFU",
        "12%",
    ], line
