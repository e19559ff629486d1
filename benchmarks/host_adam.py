"""Host AdamW: parameters per second of one optimizer step over one flat fp32 buffer, for

  probe             AdamW's memory access pattern (read p, g, m, v; write p, m, v) with
                    trivial math, on huge pages: the floor any host AdamW can reach here
  slipstream        HostAdamW (slipstream/offload/kernels/adamw.c) on buffers allocated as
                    the offload engine allocates them (huge pages: offload/hostmem.py)
  slipstream+bf16   the same with the bf16 copy-out of the new weights fused into the pass
  torch-foreach     torch.optim.AdamW(foreach=True)
  torch-fused       torch.optim.AdamW(fused=True), torch's fastest CPU path
  deepspeed         DeepSpeedCPUAdam, the real package (its op compiles on first use; cached
                    in ~/.cache/slipstream/torch_extensions)
  deepspeed+bf16    the same, then the fp32 -> bf16 copy as its own pass (as DeepSpeed does)
  ...+thp           a peer with THP_MEM_ALLOC_ENABLE=1, which makes torch's CPU allocator ask
                    for huge pages: the peer at its best (by default it does not)

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
    "torch-fused+thp",
    "deepspeed",
    "deepspeed+thp",
    "deepspeed+bf16",
    "deepspeed+bf16+thp",
)
THP_SIDES = ("probe",)  # besides the "+thp" ones: the floor is measured at its best
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def measure(side: str, n: int, threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if side.startswith("slipstream"):  # the engine's buffers (its moments are its own)
        from slipstream.offload.hostmem import host_empty

        p = host_empty(n).normal_()
        p.grad = host_empty(n).normal_().mul_(1e-3)
    else:
        p = torch.randn(n)
        p.grad = torch.randn(n) * 1e-3
    bf16 = torch.empty(n, dtype=torch.bfloat16) if "+bf16" in side else None
    if side == "slipstream+bf16":  # the engine's bf16 copy (host_empty: pinned on CUDA)
        bf16 = host_empty(n, torch.bfloat16)
    if side == "probe":
        from slipstream.offload import adamw_kernel as kernel

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
        kind = side.split("-")[1].split("+")[0]
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
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if side.endswith("+thp") or side in THP_SIDES else "0"
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
    width = max(len(s) for s in SIDES) + 2
    print(f"{'params':>8}{'threads':>8}" + "".join(f"{s:>{width}}" for s in SIDES))
    for n in sizes:
        for t in threads:
            row = [results[f"{n}/{t}/{s}"]["params_per_s"] / 1e9 for s in SIDES]
            print(f"{n / 1e6:>7.0f}M{t:>8}" + "".join(f"{x:>{width}.3f}" for x in row))
    print(
        "\nslipstream as % of the probe floor, and vs each peer at its best (the faster of its "
        "default and +thp runs; default alone in brackets), same size and threads:"
    )
    for n in sizes:
        for t in threads:
            r = {s: results[f"{n}/{t}/{s}"]["params_per_s"] for s in SIDES}
            ours = r["slipstream"]
            torch_best = max(r["torch-fused"], r["torch-fused+thp"])
            ds_best = max(r["deepspeed"], r["deepspeed+thp"])
            ds_bf16_best = max(r["deepspeed+bf16"], r["deepspeed+bf16+thp"])
            print(
                f"{n / 1e6:>7.0f}M {t} threads: {ours / r['probe']:.0%} of floor; "
                f"{ours / torch_best:.2f}x torch fused ({ours / r['torch-fused']:.2f}x), "
                f"{ours / ds_best:.2f}x DeepSpeed ({ours / r['deepspeed']:.2f}x); "
                f"bf16 copy-out costs {ours / r['slipstream+bf16'] - 1:+.0%} fused vs "
                f"{ds_best / ds_bf16_best - 1:+.0%} as DeepSpeed's separate pass; "
                f"with it {r['slipstream+bf16'] / ds_bf16_best:.2f}x DeepSpeed's step + copy"
            )
    if args.json:
        out = {**provenance(("deepspeed", "numpy")), "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
