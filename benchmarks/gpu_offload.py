"""The offload engine on an accelerator, everything in one run (`make bench-gpu-offload`):

1. the largest GPT (fixed width, growing depth) that trains one step on the device, plain
   (fp32 weights, torch's fused AdamW, bf16 autocast) and with `optim.offload` (bf16 weights,
   host masters and moments), each probe in a fresh process so an out-of-memory leaves nothing
   behind;
2. for each of the two largest: tokens/s and TFLOPS over a few steps, the device memory peak
   (`torch.cuda.max_memory_allocated`) beside the planner's estimate, and the model state
   bytes per parameter left on the device;
3. the share of the step spent moving gradients to the host (`grad_offload`) against backward.

On a machine without CUDA it runs the same code on the CPU at tiny sizes (`--smoke`), which
checks the script, not the numbers.

    python -m benchmarks.gpu_offload [--width 2048] [--seq-len 2048] [--max-layers 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import provenance, run_isolated

SIDES = ("plain", "offload")


def one_run(side: str, layers: int, width: int, seq_len: int, micro_batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from slipstream.models import GPT, GPTConfig
    from slipstream.offload.estimate import Hardware, Workload, estimate
    from slipstream.tools.memory import saved_activation_bytes
    from slipstream.train.optim import OptimConfig, build_optimizer, clip_and_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    vocab = 50_257 if cuda else 512
    cfg = GPTConfig(
        vocab_size=vocab,
        n_layer=layers,
        n_head=width // 128 or 1,
        d_model=width,
        max_seq_len=seq_len,
    )
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-4, offload=side == "offload"), device)
    x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=side == "plain" and cuda)
    times, offload_s, copy_s = [], [], []
    mover = getattr(opt, "mover", None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        before = getattr(opt, "offload_s", 0.0)
        copy_before = getattr(mover, "copy_s", 0.0)
        with autocast:
            logits = model(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        clip_and_step(opt, model, 1.0)
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 1:
            times.append(time.perf_counter() - t0)
            offload_s.append(getattr(opt, "offload_s", 0.0) - before)
            copy_s.append(getattr(mover, "copy_s", 0.0) - copy_before)
    n = model.num_params()
    step_s = statistics.median(times)
    tokens = micro_batch * seq_len
    w = Workload(
        num_params=n,
        num_layers=layers,
        width=width,
        vocab_size=vocab,
        seq_len=seq_len,
        micro_batch=micro_batch,
        saved_bytes=saved_activation_bytes(cfg, micro_batch, seq_len, torch.bfloat16),
    )
    est = estimate(side, w, Hardware(device_bytes=1e15, host_bytes=1e15, device_flops=1e15))
    # What stays on the device between steps: the weights, and (plain) the optimizer's state.
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in getattr(opt, "state", {}).values():  # the offload engine keeps its state on the host
        state += sum(
            t.numel() * t.element_size()
            for t in st.values()
            if torch.is_tensor(t) and t.device == device and t.dim()
        )
    return {
        "num_params": n,
        "tokens_per_s": tokens / step_s,
        "tflops": model.flops_per_token(seq_len) * tokens / step_s / 1e12,
        "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "planner_device_gib": est.device_bytes / 2**30,
        "state_bytes_per_param": state / n,
        "grad_offload_share": statistics.median(offload_s) / step_s,
        # the copy stream's busy time that backward hid: 1 - exposed / copy time
        "grad_copy_hidden": 1 - statistics.median(offload_s) / statistics.median(copy_s)
        if copy_s and statistics.median(copy_s) > 0
        else float("nan"),
    }


def fits(side: str, layers: int, args) -> dict | None:
    try:
        return run_isolated(
            "benchmarks.gpu_offload",
            [
                *("--one", side, "--layers", str(layers), "--width", str(args.width)),
                *("--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)),
                *("--steps", str(args.steps)),
            ],
            timeout_s=1800,
        )
    except RuntimeError as e:  # out of memory (or another failure: shown, then counted as no)
        if "out of memory" not in str(e).lower():
            print(str(e)[-500:], file=sys.stderr)
        return None


def largest(side: str, args) -> tuple[int, dict | None]:
    """Binary search on depth: the most layers whose step runs."""
    lo, hi, best = 0, args.max_layers, None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        res = fits(side, mid, args)
        print(f"{side}: {mid} layers {'fits' if res else 'does not fit'}", file=sys.stderr)
        if res:
            lo, best = mid, res
        else:
            hi = mid - 1
    return lo, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-layers", type=int, default=96)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on CPU")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.width, args.seq_len, args.micro_batch, args.max_layers = 128, 64, 2, 1
        args.steps = 2
    if args.one:
        res = one_run(args.one, args.layers, args.width, args.seq_len, args.micro_batch, args.steps)
        print(json.dumps(res))
        return
    out = {}
    for side in SIDES:
        layers, res = largest(side, args)
        out[side] = {"layers": layers, **(res or {})}
    print(f"\nwidth {args.width}, {args.micro_batch} x {args.seq_len} tokens per step")
    print(
        f"{'side':<9}{'layers':>7}{'params M':>10}{'tokens/s':>10}{'TFLOPS':>8}{'peak GiB':>10}"
        f"{'planner GiB':>13}{'B/param':>9}{'grad copy':>11}{'copy hidden':>13}"
    )
    for side, r in out.items():
        if "num_params" not in r:
            print(f"{side:<9}{'none fits':>7}")
            continue
        print(
            f"{side:<9}{r['layers']:>7}{r['num_params'] / 1e6:>10,.0f}{r['tokens_per_s']:>10,.0f}"
            f"{r['tflops']:>8.1f}{r['peak_device_gib']:>10.2f}{r['planner_device_gib']:>13.2f}"
            f"{r['state_bytes_per_param']:>9.1f}{r['grad_offload_share']:>10.0%}"
            f"{r.get('grad_copy_hidden', float('nan')):>13.0%}"
        )
    if "num_params" in out["plain"] and "num_params" in out["offload"]:
        print(
            "offload trains "
            f"{out['offload']['num_params'] / out['plain']['num_params']:.1f}x the parameters"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {**provenance(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": out},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
