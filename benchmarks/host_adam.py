"""Host AdamW: parameters per second of one optimizer step over one flat fp32 buffer, for

  probe             AdamW's memory access pattern (read p, g, m, v; write p, m, v) with
                    trivial math: the floor any host AdamW can reach on this machine
  slipstream        HostAdamW (slipstream/offload/kernels/adamw.c)
  slipstream+bf16   the same with the bf16 copy-out of the new weights fused into the pass
  torch-foreach     torch.optim.AdamW(foreach=True)
  torch-fused       torch.optim.AdamW(fused=True), torch's fastest CPU path
  deepspeed         DeepSpeedCPUAdam, the real package (its op compiles on first use; cached
                    in ~/.cache/slipstream/torch_extensions)
  deepspeed+bf16    the same, then the fp32 -> bf16 copy as its own pass (as DeepSpeed does)

at 1 and 2 threads, each in a fresh process (its own memory), median of several steps after
two warm-up steps. With --rounds R every side runs R times, the sides taking turns (A B C, A
B C, ...), and a side's value is the median of its rounds: a slow spell of the machine then
falls on every side rather than on one.

    python -m benchmarks.host_adam [--sizes 100e6,500e6] [--threads 1,2] [--steps 5]
        [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import provenance, run_isolated

ROOT = Path(__file__).resolve().parents[1]
SIDES = (
    "probe",
    "slipstream",
    "slipstream+bf16",
    "torch-foreach",
    "torch-fused",
    "deepspeed",
    "deepspeed+bf16",
)
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def measure(side: str, n: int, threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    p = torch.randn(n)
    p.grad = torch.randn(n) * 1e-3
    bf16 = torch.empty(n, dtype=torch.bfloat16) if side.endswith("+bf16") else None
    if side == "probe":
        from slipstream.offload import kernel

        lib = kernel.load()
        m, v = torch.zeros(n), torch.zeros(n)

        def step():
            lib.access_probe(
                p.data_ptr(), p.grad.data_ptr(), m.data_ptr(), v.data_ptr(), n, threads
            )
    elif side.startswith("slipstream"):
        from slipstream.offload import HostAdamW

        opt = HostAdamW([p], **HYPER, num_threads=threads)
        assert opt.uses_kernel, "the host AdamW kernel did not build"
        outs = {p: bf16} if bf16 is not None else None

        def step():
            opt.step(bf16_out=outs)
    elif side.startswith("torch"):
        kind = side.split("-")[1]
        opt = torch.optim.AdamW([p], **HYPER, **{kind: True})

        def step():
            opt.step()
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam([p], **HYPER, adamw_mode=True)

        def step():
            opt.step()
            if bf16 is not None:
                bf16.copy_(p)  # DeepSpeed's copy-out: a separate pass after the step

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"params_per_s": n / statistics.median(times), "step_s": times}


def run_one(side: str, n: int, threads: int, steps: int) -> dict:
    # OpenMP reads its thread count at start-up: DeepSpeed's op takes it from here.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "slipstream" / "torch_extensions")
    )
    args = ["--one", side, "--n", str(n), "--threads", str(threads), "--steps", str(steps)]
    return run_isolated("benchmarks.host_adam", args, timeout_s=1800)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--sizes", default="100e6,500e6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n, int(args.threads), args.steps)))
        return
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    results: dict = {}
    for n in sizes:
        for t in threads:
            rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
            for k in range(args.rounds):
                for side in SIDES:
                    res = run_one(side, n, t, args.steps)
                    rounds[side].append(res)
                    print(
                        f"{n / 1e6:.0f}M params, {t} threads, round {k + 1}, {side:>16}: "
                        f"{res['params_per_s'] / 1e9:.3f} G params/s",
                        file=sys.stderr,
                    )
            for side, runs in rounds.items():
                results[f"{n}/{t}/{side}"] = {
                    "params_per_s": statistics.median(r["params_per_s"] for r in runs),
                    "rounds": runs,
                }
    print(
        f"\nparameters per second of one AdamW step (median of {args.steps} steps"
        + (f", then of {args.rounds} rounds" if args.rounds > 1 else "")
        + "), G params/s"
    )
    print(f"{'params':>8}{'threads':>8}" + "".join(f"{s:>16}" for s in SIDES))
    for n in sizes:
        for t in threads:
            row = [results[f"{n}/{t}/{s}"]["params_per_s"] / 1e9 for s in SIDES]
            print(f"{n / 1e6:>7.0f}M{t:>8}" + "".join(f"{x:>16.3f}" for x in row))
    print("\nslipstream as % of the probe floor, and vs each peer (same size and threads):")
    for n in sizes:
        for t in threads:
            r = {s: results[f"{n}/{t}/{s}"]["params_per_s"] for s in SIDES}
            bf16_cost = r["slipstream"] / r["slipstream+bf16"] - 1
            ds_cost = r["deepspeed"] / r["deepspeed+bf16"] - 1
            print(
                f"{n / 1e6:>7.0f}M {t} threads: {r['slipstream'] / r['probe']:.0%} of floor; "
                f"{r['slipstream'] / r['torch-fused']:.2f}x torch fused, "
                f"{r['slipstream'] / r['deepspeed']:.2f}x DeepSpeed; bf16 copy-out costs "
                f"{bf16_cost:+.0%} fused vs {ds_cost:+.0%} as DeepSpeed's separate pass"
            )
    if args.json:
        out = {**provenance(("deepspeed", "numpy")), "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
