"""The whole host side of one offload step, from the gradients a device's copies staged (bf16,
one micro-batch per step) to the bf16 weights ready to go back, per parameter:

  floor       AdamW's memory access pattern (read 4 fp32 streams, write 3: 28 bytes) with
              trivial math, on huge pages: what any host pass of 28 bytes can reach here
  fused       the engine's pass (offload/grads.py): the staged gradient's sum of squares
              (2 bytes read), then one AdamW pass reading the bf16 stage, the master and the
              moments and writing them and the bf16 weights (28 bytes)
  two-pass    the engine as it was (fused=False): clear the fp32 gradient (4), add the stage
              into it (10), its norm (4), AdamW over fp32 (28) and the bf16 copy-out (2)
  deepspeed   DeepSpeed's host path as its users run it: the staged gradient copied into the
              fp32 gradient partition (torch's copy_), DeepSpeedCPUAdam's step, the separate
              fp32 -> bf16 copy of the weights (its norm pass is not counted: in its favour)
  deepspeed+thp   the same with THP_MEM_ALLOC_ENABLE=1 (torch's allocator asks for huge
              pages): the peer at its best

at 1 and 2 threads, each side in a fresh process, median of several steps after two warm-up
steps; with --rounds R the sides take turns R times and a side's value is the median of its
rounds.

    python -m benchmarks.host_pass [--sizes 100e6,500e6] [--threads 1,2] [--steps 3]
        [--rounds 3] [--json FILE]
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

SIDES = ("floor", "fused", "two-pass", "deepspeed", "deepspeed+thp")
BYTES = {"floor": 28, "fused": 30, "two-pass": 48}  # per parameter, as counted above
HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def measure(side: str, n: int, threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from slipstream.offload import HostAdamW
    from slipstream.offload import adamw_kernel as kernel
    from slipstream.offload.hostmem import host_empty

    ours = side in ("floor", "fused", "two-pass")
    # The staged gradient as a device's copy leaves it (pinned on a GPU machine; here host
    # memory in huge pages, as the engine allocates on a CPU).
    stage = host_empty(n, torch.bfloat16).normal_().mul_(1e-3)
    out = host_empty(n, torch.bfloat16) if ours else torch.empty(n, dtype=torch.bfloat16)
    p = host_empty(n).normal_() if ours else torch.randn(n)
    if side == "floor":
        lib = kernel.load()
        g, m, v = host_empty(n).normal_(), host_empty(n).zero_(), host_empty(n).zero_()

        def step():
            lib.access_probe(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), n, threads)
    elif side == "fused":
        opt = HostAdamW([p], **HYPER, num_threads=threads)
        assert opt.uses_kernel, "the host AdamW kernel did not build"

        def step():
            sq = opt.sumsq(stage)
            opt.step(grad_scale=min(1.0, 1.0 / (sq**0.5 + 1e-6)), bf16_out={p: out},
                     sources={p: (stage, None)})  # fmt: skip
    elif side == "two-pass":
        opt = HostAdamW([p], **HYPER, num_threads=threads)
        p.grad = host_empty(n)

        def step():
            p.grad.zero_()
            opt.add_grad(p.grad, stage)
            sq = opt.sumsq(p.grad)
            opt.step(grad_scale=min(1.0, 1.0 / (sq**0.5 + 1e-6)), bf16_out={p: out})
    else:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam([p], **HYPER, adamw_mode=True)
        p.grad = torch.empty(n)

        def step():
            p.grad.copy_(stage)
            opt.step()
            out.copy_(p)

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"params_per_s": n / statistics.median(times), "step_s": times}


def run_one(side: str, n: int, threads: int, steps: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # DeepSpeed's op reads it at start-up
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if side.endswith("+thp") else "0"
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "slipstream" / "torch_extensions")
    )
    args = ["--one", side, "--n", str(n), "--threads", str(threads), "--steps", str(steps)]
    return run_isolated("benchmarks.host_pass", args, timeout_s=1800)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--sizes", default="100e6,500e6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n, int(args.threads), args.steps)))
        return
    sides = args.sides.split(",")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    results: dict = {}
    for n in sizes:
        for t in threads:
            rounds: dict[str, list[dict]] = {side: [] for side in sides}
            for k in range(args.rounds):
                for side in sides:
                    res = run_one(side, n, t, args.steps)
                    rounds[side].append(res)
                    print(f"{n / 1e6:.0f}M params, {t} threads, round {k + 1}, {side:>14}: "
                          f"{1e9 / res['params_per_s']:.2f} ns/param", file=sys.stderr)  # fmt: skip
            for side, runs in rounds.items():
                results[f"{n}/{t}/{side}"] = {
                    "params_per_s": statistics.median(r["params_per_s"] for r in runs),
                    "rounds": runs,
                }
    print(f"\nthe host side of one offload step, ns per parameter (median of {args.steps} "
          f"steps, then of {args.rounds} rounds); bytes moved per parameter in brackets")  # fmt: skip
    width = 16
    print(f"{'params':>8}{'threads':>8}" + "".join(f"{s:>{width}}" for s in sides))
    for n in sizes:
        for t in threads:
            row = [1e9 / results[f"{n}/{t}/{s}"]["params_per_s"] for s in sides]
            print(f"{n / 1e6:>7.0f}M{t:>8}" + "".join(f"{x:>{width}.2f}" for x in row))
    if {"fused", "two-pass", "floor"} <= set(sides):
        print("\nfused vs two-pass, vs DeepSpeed at its best (default alone in brackets), "
              "and as % of the 28-byte floor:")  # fmt: skip
        for n in sizes:
            for t in threads:
                r = {s: results[f"{n}/{t}/{s}"]["params_per_s"] for s in sides}
                line = f"{n / 1e6:>7.0f}M {t} threads: {r['fused'] / r['two-pass']:.2f}x two-pass"
                if "deepspeed" in r:
                    best = max(r["deepspeed"], r.get("deepspeed+thp", 0.0))
                    line += (
                        f", {r['fused'] / best:.2f}x DeepSpeed ({r['fused'] / r['deepspeed']:.2f}x)"
                    )
                line += f", {r['fused'] / r['floor']:.0%} of the floor"
                print(line)
    if args.json:
        out = {**provenance(("deepspeed",)), "bytes_per_param": BYTES, "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
