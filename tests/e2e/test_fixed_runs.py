"""The recorded runs of `fixed_runs.py` give the losses they gave when recorded: bit for bit
on the kind of CPU they were recorded on, within a stated tolerance on another."""

from __future__ import annotations

import json

import pytest

from tests.e2e.fixed_runs import FIXTURE, RUNS, machine, run

RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_a_fixed_run_gives_its_recorded_losses(tmp_path, name):
    if name.startswith("ray"):
        pytest.importorskip("ray")
    got = run(name, tmp_path)
    want = RECORDED["losses"][name]
    if machine() == RECORDED["machine"]:
        assert got == want  # the same code on the same kind of CPU: the same bits
    else:
        # Another instruction set blocks torch's CPU sums differently, which reorders fp32
        # additions just as splitting a matmul over ranks does; over these 6 steps that
        # reordering moved the loss by 4e-8 (tp = 2 against one process, test_train.py).
        # 1e-4 leaves a wide margin for Adam's growth of it, while a change in what is
        # computed (a wrong batch, a lost gradient) moves the loss by >1e-3 from step 2 on.
        assert got == pytest.approx(want, rel=1e-4)
