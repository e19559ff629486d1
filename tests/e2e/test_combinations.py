"""Every lever in one run: {local, ray} data x {dp 1, 2} x {tp 1, 2} x {device AdamW, offload,
ZeRO-2 offload}, each against one process with the same global batch. A subset runs in
`make test`; `make test-all` (pytest --all) runs the whole matrix."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.e2e.test_train import (
    losses,
    reference_losses,
    torchrun,
    write_hf_recipe,
    write_recipe,
)

__all__ = ["reference_losses"]  # the one-process losses, a fixture of test_train.py

OPTIMIZERS = {
    "adamw": (),
    "offload": ("optim.offload=true", "optim.offload_dtype='fp32'"),
    "zero2": ("optim.offload=true", "optim.offload_dtype='fp32'", "optim.zero_stage=2"),
}
# local dp 2 x tp 2 with ZeRO-2 runs in the resume test below (its first 3 steps, then on
# another data-parallel size) and with the Ray backend here.
FAST = {
    ("local", 1, 2, "offload"),
    ("local", 2, 1, "zero2"),
    ("ray", 2, 2, "zero2"),
}


def _combos():
    for backend in ("local", "ray"):
        for dp in (1, 2):
            for tp in (1, 2):
                # offload on several data-parallel ranks shards its state: that is ZeRO-2
                for optim in ("adamw", "zero2") if dp > 1 else ("adamw", "offload"):
                    combo = (backend, dp, tp, optim)
                    marks = () if combo in FAST else pytest.mark.combinations
                    yield pytest.param(*combo, marks=marks, id=f"{backend}-dp{dp}-tp{tp}-{optim}")


def train(tmp_path, backend: str, dp: int, tp: int, optim: str, *extra: str) -> list[float]:
    # The global batch is 2 micro-batches of 2 rows: split over the data-parallel ranks.
    recipe = write_recipe(tmp_path, num_micro_batches=2 // dp)
    run = tmp_path / "run"
    sets = [f"train.out_dir='{run}'", f"parallel.tp={tp}", f"data.backend.kind='{backend}'"]
    args = [a for s in (*sets, *OPTIMIZERS[optim], *extra) for a in ("--set", s)]
    nproc = dp * tp
    out = (
        run_cli("train", str(recipe), *args) if nproc == 1 else torchrun(recipe, *args, nproc=nproc)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return losses(run)


@pytest.mark.parametrize(("backend", "dp", "tp", "optim"), list(_combos()))
def test_levers_combined_give_the_one_process_losses(
    tmp_path, reference_losses, backend, dp, tp, optim
):
    if backend == "ray":
        pytest.importorskip("ray")
    got = train(tmp_path, backend, dp, tp, optim)
    # fp32 everywhere. Splitting matmuls over ranks and summing over ranks reorders fp32
    # additions (measured: 5e-8 relative over these 6 steps, dp 2 x tp 2 with ZeRO-2); the
    # offload engine's host norm sums in double where torch's sums in fp32 (~1e-6 relative,
    # test_engine.py), which Adam carries into the weights. 1e-5 leaves a margin; a lost or
    # doubled gradient, or a wrong slice, moves the loss by >1e-3 from step 2 on.
    assert got == pytest.approx(reference_losses, rel=1e-5)


def test_a_sharded_tensor_parallel_run_resumes_on_another_data_parallel_size(
    tmp_path, reference_losses
):
    """dp 2 x tp 2 with ZeRO-2 offload, stopped at step 3 (its host state in one file per
    rank and slice), resumed on dp 1 x tp 2 (offload, the whole state on each slice's rank):
    the losses of one process, uninterrupted."""
    first = train(tmp_path, "local", 2, 2, "zero2", "train.stop_at_step=3")
    assert first == pytest.approx(reference_losses[:3], rel=1e-5)  # tolerance: the matrix's
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*/optimizer*"))
    assert names == [f"optimizer.shard{r}.tp{t}.pt" for r in (0, 1) for t in (0, 1)]
    recipe = write_recipe(tmp_path, "one.toml", num_micro_batches=2)
    args = [f"train.out_dir='{tmp_path / 'run'}'", "parallel.tp=2", *OPTIMIZERS["offload"]]
    out = torchrun(recipe, "--resume", *[a for s in args for a in ("--set", s)], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    # The same tolerance as above: the rest runs with other reduction orders.
    assert losses(tmp_path / "run") == pytest.approx(reference_losses, rel=1e-5)


def test_the_delayed_update_on_a_sharded_tensor_parallel_mesh(tmp_path):
    """The delayed update with ZeRO-2 on dp 2 x tp 2: the one-process delayed run's losses
    (each step's gradient taken one update behind, the same on both)."""
    delayed = ("optim.delayed_update=true", "optim.delayed_update_start=2")
    want = train(tmp_path / "one", "local", 1, 1, "offload", *delayed)
    got = train(tmp_path / "mesh", "local", 2, 2, "zero2", *delayed)
    assert got == pytest.approx(want, rel=1e-5)  # tolerance: see the matrix above


def test_a_hugging_face_llama_trains_with_tensor_parallelism(tmp_path):
    """`model.kind = "hf"` (a small random Llama whose heads split) with parallel.tp = 2 and
    the offload engine: the one-process losses."""
    pytest.importorskip("transformers")
    recipe = write_hf_recipe(tmp_path)
    runs = {}
    for nproc, extra in ((1, ()), (2, ("parallel.tp=2", *OPTIMIZERS["offload"]))):
        args = [
            a for s in (f"train.out_dir='{tmp_path / str(nproc)}'", *extra) for a in ("--set", s)
        ]
        out = run_cli("train", str(recipe), *args) if nproc == 1 else torchrun(recipe, *args)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[nproc] = losses(tmp_path / str(nproc))
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)  # tolerance: see the matrix above
