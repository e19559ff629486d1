"""Adding a bf16 gradient into its fp32 host buffer, the offload engine's host-side work for
each gradient that arrives (on CUDA from the pinned staging buffer, on CPU from the model):

  torch-add         dst.add_(src), torch's mixed-dtype add (what the CUDA path did)
  torch-to-add      dst.add_(src.to(torch.float32)) (what the CPU path did: a temporary)
  slipstream        HostAdamW.add_grad: the kernel in offload/kernels/adamw.c

Elements per second, medians of the repeats, the sides taking turns within each repeat (a
slow spell of the machine falls on every side). The bytes each must move: read 2 + read 4 +
write 4 per element. On one H200's host this add took 49% of an offload step
(results/2026-11-30-gpu-session.md).

    python -m benchmarks.grad_add [--sizes 100e6] [--threads 1,2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import provenance

SIDES = ("torch-add", "torch-to-add", "slipstream")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100e6")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from slipstream.offload.host_adam import HostAdamW

    report: dict = {"runs": {}}
    for n in (int(float(s)) for s in args.sizes.split(",")):
        src = torch.randn(n).bfloat16()
        dst = torch.zeros(n)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            opt = HostAdamW([torch.zeros(1)], num_threads=threads)
            if not opt.uses_kernel:
                raise SystemExit("grad_add: the host kernel did not build (no C compiler?)")
            fns = {
                "torch-add": lambda d=dst, s=src: d.add_(s),
                "torch-to-add": lambda d=dst, s=src: d.add_(s.to(torch.float32)),
                "slipstream": lambda d=dst, s=src, o=opt: o.add_grad(d, s),
            }
            for fn in fns.values():  # warm-up: first touch, thread pools
                fn()
            times: dict[str, list[float]] = {s: [] for s in SIDES}
            for _ in range(args.repeats):
                for side, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[side].append(time.perf_counter() - t0)
            key = f"{n:.0e} x {threads} thread(s)"
            rate = {s: n / statistics.median(t) / 1e9 for s, t in times.items()}
            report["runs"][key] = {"g_elems_per_s": rate, "seconds": times}
            print(
                f"{key}: "
                + ", ".join(f"{s} {r:.2f} G/s" for s, r in rate.items())
                + f"; slipstream / torch-add {rate['slipstream'] / rate['torch-add']:.1f}x"
                + f", / torch-to-add {rate['slipstream'] / rate['torch-to-add']:.1f}x"
            )
    if args.json:
        args.json.write_text(json.dumps({**provenance(), **report}, indent=2))


if __name__ == "__main__":
    main()
