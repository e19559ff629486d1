"""The doctor's predictions against what its levers did: for each scenario with a bottleneck
put in (doctor_scenarios.py), `slipstream doctor RECIPE --verify` several times; the top
lever's predicted gain beside the measured one (medians over repeats), and what recording
costs a normal run (measured when every scenario runs).

    python -m benchmarks.doctor [--repeats 3] [--steps 20] [--json PATH] [--scenarios NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import doctor_scenarios as scenarios
from benchmarks.harness import ROOT, provenance

VERIFIED = ("data", "imbalance", "offload", "communication")


def doctor(recipe: Path, out: Path, steps: int, nproc: int, verify: bool) -> dict:
    cmd = [sys.executable, "-m", "slipstream", "doctor", str(recipe), "--steps", str(steps),
           "--nproc", str(nproc), "--out", str(out)] + (["--verify"] if verify else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}:\n{done.stderr[-3000:]}")
    return json.loads((out / "doctor.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    ap.add_argument("--scenarios", nargs="+", choices=VERIFIED, default=list(VERIFIED))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="doctor-bench-"))
    rows = []
    for name in args.scenarios:
        recipe, run = scenarios.write(root / name, name)
        runs = []
        for i in range(args.repeats):
            r = doctor(recipe, root / name / f"run{i}", args.steps, run["nproc"], True)
            v, top = r["verify"], r["findings"][0]
            runs.append({"top": top["kind"], "lever": top["lever"],
                         "predicted": v.get("predicted_fraction"),
                         "measured": v.get("measured_fraction"),
                         "step_s_before": v.get("step_s_before"),
                         "step_s_after": v.get("step_s_after"),
                         "confidence": (top["gain"] or {}).get("confidence")})  # fmt: skip
            print(name, i, runs[-1], flush=True)
        checked = [x for x in runs if x["predicted"] is not None]
        pred = statistics.median(x["predicted"] for x in checked) if checked else None
        meas = statistics.median(x["measured"] for x in checked) if checked else None
        rows.append({"scenario": name, "runs": runs, "predicted": pred, "measured": meas,
                     "error": (meas - pred) / pred if pred else None})  # fmt: skip
    # What recording costs: every run's records time themselves (profile/record.py).
    overheads = []
    if args.scenarios == list(VERIFIED):
        recipe, _ = scenarios.write(root / "compute", "compute")
        overheads = [doctor(recipe, root / "compute" / f"run{i}", args.steps, 1, False)
                     ["profile"]["overhead"] for i in range(args.repeats)]  # fmt: skip
    result = {**provenance(), "command": "python -m benchmarks.doctor " + " ".join(sys.argv[1:]),
              "scenarios": rows, "overhead": overheads,
              "overhead_median": statistics.median(overheads) if overheads else None}  # fmt: skip
    print(f"{'scenario':<14} {'top lever':<44} {'predicted':>9} {'measured':>9} {'error':>7}")
    for row in rows:
        lever = " ".join(row["runs"][0]["lever"])
        p, m, e = row["predicted"], row["measured"], row["error"]
        print(f"{row['scenario']:<14} {lever:<44} {p:>9.0%} {m:>9.0%} {e:>+7.0%}"
              if p is not None else f"{row['scenario']:<14} {lever:<44} (not checked)")  # fmt: skip
    if overheads:
        print(f"recording: {result['overhead_median']:.3%} of the step (median of "
              f"{args.repeats})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
