"""The doctor's rules on records of known numbers: each names its bottleneck, its lever and
the gain its what-if model gives (checked against the model's formula by hand), and stays
silent below the 10% threshold."""

from __future__ import annotations

import pytest

from slipstream.profile import Models, examine, measure
from slipstream.profile.timeline import PHASES

STEPS = 12


def record(rank: int, phases_ms: dict[str, float], *, dp: int = 1, rank_cost: float = 100.0,
           imbalance: float = 1.0, busy_ms=(1.0, 1.0), cpu_frac: float = 0.0,
           optimizer: dict | None = None, max_cost: float | None = None) -> dict:  # fmt: skip
    """One rank's record: every step the same phases (ms), `busy_ms` of loader work per step
    per source."""
    ph = {p: phases_ms.get(p, 0.0) / 1e3 for p in (*PHASES, "other")}
    step = sum(ph.values())
    cols = {f"{p}_s": [v] * STEPS for p, v in ph.items()}
    cols.update(step_s=[step] * STEPS, step=list(range(1, STEPS + 1)), tokens=[1000.0] * STEPS,
                imbalance=[imbalance] * STEPS,
                max_rank_cost=[max_cost or rank_cost * imbalance] * STEPS,
                rank_cost=[rank_cost] * STEPS)  # fmt: skip
    busy = [b / 1e3 * STEPS for b in busy_ms]
    return {
        "rank": rank, "steps": cols, "steps_seen": STEPS, "overhead_s": 1e-5 * STEPS,
        "topology": {"rank": rank, "world_size": dp, "dp_rank": rank, "dp_size": dp,
                     "tp_rank": 0, "tp_size": 1},
        "device": {"type": "cpu", "name": "cpu", "threads": 1, "cpus": 2},
        "memory": {"host_peak_bytes": 1e9, "host_capacity_bytes": 8e9},
        "model": {"num_params": 1e6, "flops_per_token": 6e6, "dtype": "fp32"},
        "data": {"sources": ["a", "slow"], "busy_s": busy, "cpu_s": [b * cpu_frac for b in busy],
                 "docs": [10 * STEPS, 10 * STEPS], "tokens": [500.0 * STEPS] * 2},
        "optimizer": optimizer or {},
    }  # fmt: skip


def config(**settings) -> dict:
    backend = {"kind": "local", "num_workers": settings.get("workers", 1), "pool": "thread",
               "prefetch_steps": 2}  # fmt: skip
    return {
        "model": {"activation_checkpointing": False},
        "data": {"backend": backend, "balance": {"method": settings.get("balance", "greedy")},
                 "micro_batch_size": 4, "num_micro_batches": 1, "seq_len": 64,
                 "sources": [{"name": "a"}, {"name": "slow", "transform": settings.get("t")}]},
        "optim": {"offload": settings.get("offload", False), "delayed_update": False,
                  "offload_threads": settings.get("offload_threads", 0)},
        "parallel": {"tp": 1, "overlap": "auto"},
        "train": {"precision": "auto"},
    }  # fmt: skip


def top(records, cfg, models=None):
    return examine(measure(records, cfg, skip=2), models)[0]


def test_data_bound_names_the_slow_source_and_the_workers_that_remove_the_wait():
    # 60 ms of loads per step (57 in 'slow') over 1 worker against 20 ms of the consumer's.
    rec = record(0, {"data_wait": 40, "forward": 8, "backward": 12}, busy_ms=(3, 57))
    f = top([rec], config(workers=1))
    assert f.kind == "data" and f.severity == "critical"
    assert "'slow'" in f.verdict and "95%" in f.verdict
    # ceil(60 / (0.8 * 20)) = 4 workers; 60 / 4 = 15 ms < 20 ms: no wait left.
    assert f.lever == ["--set data.backend.num_workers=4"]
    assert f.gain.predicted_step_s == pytest.approx(0.020)
    assert f.gain.fraction == pytest.approx(2 / 3)
    assert f.gain.confidence == "high"  # the model's wait today (40 ms) is the measured one


def test_a_wait_spread_over_sources_blames_none():
    rec = record(0, {"data_wait": 40, "forward": 8, "backward": 12}, busy_ms=(30, 30))
    f = top([rec], config())
    assert f.kind == "data" and "spread over sources" in f.verdict and "'slow'" not in f.verdict


def test_a_python_transform_in_threads_gets_processes():
    rec = record(0, {"data_wait": 40, "forward": 8, "backward": 12}, busy_ms=(3, 57),
                 cpu_frac=1.0)  # fmt: skip
    f = top([rec], config(t="mod:fn"))
    assert "--set data.backend.pool=process" in f.lever
    # CPU-bound: only the free cores (2 CPUs - 1 training thread) count.
    f = top([rec], config(t="mod:fn"), Models(free_cores=1))
    assert f.gain.predicted_step_s == pytest.approx(0.060)  # one worker: no gain


def test_below_ten_percent_nothing_but_compute():
    rec = record(0, {"data_wait": 0.9, "forward": 40, "backward": 55, "optimizer": 4.1})
    found = examine(measure([rec], config(), skip=2))
    assert [f.kind for f in found] == ["compute"]
    assert "95% of each step in forward and backward" in found[0].verdict
    assert found[0].gain is None and "nothing to gain" in found[0].note


def test_warning_from_ten_percent_critical_from_twenty():
    warn = record(0, {"data_wait": 15, "forward": 85}, busy_ms=(30, 70))
    crit = record(0, {"data_wait": 25, "forward": 75}, busy_ms=(30, 70))
    assert top([warn], config()).severity == "warning"
    assert top([crit], config()).severity == "critical"


def test_a_straggler_is_named_with_its_phase_and_what_it_costs():
    fast = {"forward": 10, "backward": 20, "comm": 30, "optimizer": 2}
    slow = {"forward": 10, "backward": 50, "comm": 2, "optimizer": 2}  # backward: +30 ms
    recs = [record(0, fast, dp=2), record(1, slow, dp=2)]
    f = next(f for f in examine(measure(recs, config(), skip=2)) if f.kind == "straggler")
    assert "rank 1" in f.verdict and "in backward" in f.verdict
    assert f.why["relative_score"] == pytest.approx(32 / 62)  # own time: step - comm
    # Without it, every rank would wait for the next slowest (32 ms of own work, not 62).
    assert f.gain.step_s - f.gain.predicted_step_s == pytest.approx(0.030)


def test_a_slow_rank_whose_rows_cost_more_is_imbalance_not_a_straggler():
    fast = {"forward": 10, "backward": 20, "comm": 30}
    slow = {"forward": 20, "backward": 40, "comm": 0}
    recs = [record(0, fast, dp=2, rank_cost=50, imbalance=1.33, max_cost=100),
            record(1, slow, dp=2, rank_cost=100, imbalance=1.33, max_cost=100)]  # fmt: skip
    found = examine(measure(recs, config(balance="none"), skip=2),
                    Models(balanced={"method": "kk", "cost_ratio": 0.8}))  # fmt: skip
    kinds = [f.kind for f in found]
    assert "straggler" not in kinds and "imbalance" in kinds
    f = found[kinds.index("imbalance")]
    assert f.lever == ["--set data.balance.method=kk"]
    # Forward + backward fitted against cost: 30 ms at 50, 60 ms at 100, so 0.6 ms per unit;
    # the costliest rank (100) at 0.8 of its cost saves 12 ms.
    assert f.gain.step_s - f.gain.predicted_step_s == pytest.approx(0.012)


def test_the_balance_gain_leaves_out_what_does_not_scale_with_cost():
    # 20 ms of forward and backward that no row's cost explains (fixed), 0.2 ms per unit.
    fast = {"forward": 10, "backward": 20, "comm": 10}
    slow = {"forward": 10, "backward": 30, "comm": 0}
    recs = [record(0, fast, dp=2, rank_cost=50, imbalance=1.33, max_cost=100),
            record(1, slow, dp=2, rank_cost=100, imbalance=1.33, max_cost=100)]  # fmt: skip
    found = examine(measure(recs, config(balance="none"), skip=2),
                    Models(balanced={"method": "kk", "cost_ratio": 0.5}))  # fmt: skip
    f = next(f for f in found if f.kind == "imbalance")
    assert f.gain.step_s - f.gain.predicted_step_s == pytest.approx(0.0002 * 100 * 0.5)


def test_exposed_communication_counts_the_rank_that_waits_least():
    a = {"forward": 10, "backward": 20, "comm": 40}
    b = {"forward": 12, "backward": 20, "comm": 38}
    found = examine(measure([record(0, a, dp=2), record(1, b, dp=2)], config(), skip=2))
    f = next(f for f in found if f.kind == "communication")
    assert f.lever == ["--set data.num_micro_batches=2"]
    assert f.why["exposed_comm_s"] == pytest.approx(0.038)
    # Twice the tokens per all-reduce: 38 ms per step becomes 19 per today's tokens.
    assert f.gain.step_s - f.gain.predicted_step_s == pytest.approx(0.019)


def test_offload_where_plain_fits_says_turn_it_off():
    rec = record(0, {"forward": 10, "backward": 20, "grad_offload": 30, "optimizer": 40},
                 optimizer={"offload/host_gb_per_s": 10.0})  # fmt: skip
    memory = {"capacity_bytes": 8e9, "source": "host", "current": {"strategy": "offload",
              "device_bytes": 1e8, "step_s": 0.1}, "best": None,
              "rows": [{"strategy": "plain", "fits": True, "device_bytes": 2e8}]}  # fmt: skip
    f = top([rec], config(offload=True), Models(memory=memory, offload_plain_s=0.005))
    assert f.kind == "offload" and f.lever == ["--set optim.offload=false"]
    assert f.gain.predicted_step_s == pytest.approx(0.100 - 0.070 + 0.005)


def test_a_model_that_does_not_fit_gets_the_planners_strategy():
    rec = record(0, {"forward": 40, "backward": 60})
    best = {"strategy": "offload", "device_bytes": 0.5e9, "step_s": 0.2,
            "lever": ["--set optim.offload=true"]}  # fmt: skip
    memory = {"capacity_bytes": 1e9, "source": "--device-gib 1", "best": best,
              "current": {"strategy": "plain", "device_bytes": 2e9, "step_s": 0.1},
              "rows": [best]}  # fmt: skip
    f = top([rec], config(), Models(memory=memory))
    assert f.kind == "memory" and f.severity == "critical"
    assert "does not fit" in f.verdict and f.lever == ["--set optim.offload=true"]
    assert f.gain.predicted_step_s == pytest.approx(0.2)  # the planner's 2x step


def test_a_run_without_records_is_one_line(tmp_path):
    from slipstream.profile.measure import load_records

    with pytest.raises(ValueError, match="no profile/rank"):
        load_records(tmp_path)
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "rank-000.json").write_text("{trunc")
    with pytest.raises(ValueError, match="unreadable"):
        load_records(tmp_path)


def test_a_lever_that_would_not_gain_is_not_proposed():
    # The plain step (80 ms) slower than the whole host side (70 ms): offload stays.
    rec = record(0, {"forward": 10, "backward": 20, "grad_offload": 30, "optimizer": 40})
    memory = {"capacity_bytes": 8e9, "source": "host", "best": None,
              "current": {"strategy": "offload", "device_bytes": 1e8, "step_s": 0.1},
              "rows": [{"strategy": "plain", "fits": True, "device_bytes": 2e8}]}  # fmt: skip
    f = top([rec], config(offload=True), Models(memory=memory, offload_plain_s=0.080))
    assert f.kind == "offload" and f.gain is None
    assert "--set optim.offload=false" not in f.lever and "gains nothing" in f.note


def test_a_host_step_faster_than_the_plain_one_keeps_offload_and_gets_more_threads():
    # The plain step (80 ms) slower than the host side (70 ms); the host step (40 ms) on 1 of
    # 2 cores at 1.6x the bandwidth on both: 40 / 1.6 = 25 ms, 15 ms off a 100 ms step.
    rec = record(0, {"forward": 10, "backward": 20, "grad_offload": 30, "optimizer": 40},
                 optimizer={"offload/host_step_s": 0.040})  # fmt: skip
    memory = {"capacity_bytes": 8e9, "source": "host", "best": None,
              "current": {"strategy": "offload", "device_bytes": 1e8, "step_s": 0.1},
              "rows": [{"strategy": "plain", "fits": True, "device_bytes": 2e8}]}  # fmt: skip
    models = Models(memory=memory, offload_plain_s=0.080, host_scaling=1.6)
    f = top([rec], config(offload=True, offload_threads=1), models)
    assert f.kind == "offload" and f.lever == ["--set optim.offload_threads=2"]
    assert f.gain.predicted_step_s == pytest.approx(0.100 - 0.040 + 0.025)
    assert f.why["plain_step_s"] == 0.080 and "optim.offload=false gains nothing" in f.note


def test_blocking_tensor_parallel_communication_gets_the_overlap():
    a = {"forward": 10, "backward": 20, "comm": 40}
    recs = [record(r, a, dp=2) for r in range(2)]
    for rec in recs:
        rec["topology"].update(tp_size=2, dp_size=1)
    cfg = config()
    cfg["parallel"] = {"tp": 2, "overlap": "reference"}
    f = next(f for f in examine(measure(recs, cfg, skip=2)) if f.kind == "communication")
    assert f.lever == ["--set parallel.overlap=shm"]  # a CPU: the shared-memory heap
    assert f.gain.confidence == "low"  # no model of this link's overlap yet: said so


def test_the_doctor_never_replaces_a_run_it_did_not_make(tmp_path, capsys):
    from slipstream.cli import main

    recipe, run = tmp_path / "r.toml", tmp_path / "mine"
    recipe.write_text("[train]\nsteps = 5\n")
    run.mkdir()
    (run / "config.json").write_text("{}")  # someone's run
    assert main(["doctor", str(recipe), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds a run the doctor did not make" in err and err.count("\n") == 1
    assert (run / "config.json").read_text() == "{}"
