"""The offload engine on an accelerator, everything in one run (`make bench-gpu`):

1. the largest GPT (fixed width, growing depth) that trains on the device, plain (fp32
   weights, torch's fused AdamW, bf16 autocast) and with `optim.offload` (bf16 weights, host
   masters and moments), each probe in a fresh process so an out-of-memory leaves nothing
   behind. The search starts at the depth the memory planner predicts and brackets the
   answer in a few probes (`--probes`): each probe of a large model costs tens of seconds.
   `--device-gib` caps the memory the process may take (torch's per-process fraction), so
   the search runs on a budget of a smaller card (and host memory is not what stops it);
2. for the largest of each: tokens/s and TFLOPS over a few steps, the device memory peak
   (`torch.cuda.max_memory_allocated`) beside the planner's estimate, and the model state
   bytes per parameter left on the device;
3. the share of the step spent waiting for gradients on their way to the host, and how much
   of the copy stream's busy time backward hid.

On a machine without CUDA it runs the same code on the CPU at tiny sizes (`--smoke`), which
checks the script, not the numbers.

    python -m benchmarks.gpu_offload [--device-gib 16] [--width 2048] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import provenance, run_isolated

SIDES = ("plain", "offload")  # part 1: the largest model of each
RUN_SIDES = (*SIDES, "offload+dpu")  # part 2: throughput at one size


def grad_wait_s(opt) -> float:
    """Host seconds the optimizer spent moving or waiting for gradients (its meters)."""
    return sum(read() for phase, read in opt.meters() if phase == "grad_offload")


def _vocab(cuda: bool) -> int:
    """GPT-2's vocabulary on a GPU; a small one for the CPU smoke run."""
    return 50_257 if cuda else 512


def _config(layers: int, width: int, seq_len: int, vocab: int):
    from slipstream.models import GPTConfig

    return GPTConfig(
        vocab_size=vocab, n_layer=layers, n_head=width // 128 or 1, d_model=width,
        max_seq_len=seq_len,
    )  # fmt: skip


@functools.cache
def _saved_per_layer(
    width: int, seq_len: int, micro_batch: int, vocab: int, device: str, mixed: bool
):
    """(saved bytes of a 1-layer model, bytes each further layer adds), traced on `device`:
    on a GPU with its own kernels (exact for them), else on the meta device. `mixed`: fp32
    weights under bf16 autocast, as the plain side trains (a GPU only); else bf16 weights."""
    import torch

    from slipstream.tools.memory import saved_activation_bytes

    mixed = mixed and device != "meta"
    dtype, autocast = (torch.float32, torch.bfloat16) if mixed else (torch.bfloat16, None)
    one, two = (
        saved_activation_bytes(
            _config(n, width, seq_len, vocab), micro_batch, seq_len, dtype, device, autocast
        )
        for n in (1, 2)
    )
    if device != "meta":
        torch.cuda.empty_cache()
    return one, two - one


def workload(layers: int, args, vocab: int, side: str = "offload"):
    """The planner's view of the model: parameters counted on the meta device, activations
    traced (on the GPU when there is one, as `side` trains: see `_saved_per_layer`)."""
    import torch

    from slipstream.models import GPT
    from slipstream.offload.estimate import Workload

    cfg = _config(layers, args.width, args.seq_len, vocab)
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    device = "cuda" if torch.cuda.is_available() else "meta"
    first, per_layer = _saved_per_layer(
        args.width, args.seq_len, args.micro_batch, vocab, device, side == "plain"
    )
    return Workload(
        num_params=n,
        num_layers=layers,
        width=args.width,
        vocab_size=vocab,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        saved_bytes=first + (layers - 1) * per_layer,
    )


def predicted_layers(side: str, args, device_bytes: float, vocab: int) -> int:
    """The most layers the planner says fit in `device_bytes` (0 if none)."""
    from slipstream.offload.estimate import Hardware, estimate

    hw = Hardware(device_bytes=device_bytes, host_bytes=1e15, device_flops=1e15)
    lo, hi = 0, args.max_layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(side, workload(mid, args, vocab, side), hw).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def one_run(
    side: str, layers: int, width: int, seq_len: int, micro_batch: int, steps: int,
    device_gib: float = 0.0,
) -> dict:  # fmt: skip
    import torch
    import torch.nn.functional as F

    from slipstream.models import GPT
    from slipstream.train.optim import OptimConfig, build_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    vocab = _vocab(cuda)
    cfg = _config(layers, width, seq_len, vocab)
    if cuda and device_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, device_gib * 2**30 / total))
    torch.manual_seed(0)
    # Offload: made in bf16 on the device at once (an fp32 copy first would be a transient
    # the engine never needs); plain: fp32, as torch's AdamW with autocast trains it.
    offload = side.startswith("offload")
    dtype = torch.bfloat16 if offload and cuda else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT(cfg)
    finally:
        torch.set_default_dtype(default)
    ocfg = OptimConfig(lr=1e-4, offload=offload, delayed_update=side == "offload+dpu")
    opt = build_optimizer(model, ocfg, device)
    x = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=side == "plain" and cuda)
    times, offload_s, copy_s, copy_tail_s = [], [], [], []
    mover = getattr(opt, "mover", None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        before = grad_wait_s(opt)
        copy_before = getattr(mover, "copy_s", 0.0)
        with autocast:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        del logits  # as the trainer's loss does: the logits are not held through backward
        loss.backward()
        if cuda:
            backward_done = torch.cuda.Event(enable_timing=True)
            backward_done.record()
        opt.step(1.0)
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 1:
            times.append(time.perf_counter() - t0)
            offload_s.append(grad_wait_s(opt) - before)
            copy_s.append(getattr(mover, "copy_s", 0.0) - copy_before)
            last = getattr(mover, "last_copy_done", None)
            if cuda and last is not None:  # copy time left after backward, device clock
                copy_tail_s.append(max(0.0, backward_done.elapsed_time(last)) / 1e3)
    n = model.num_params()
    step_s = statistics.median(times)
    tokens = micro_batch * seq_len
    # What stays on the device between steps: the weights, and (plain) the optimizer's state.
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in getattr(opt, "state", {}).values():  # the offload engine keeps its state on the host
        state += sum(
            t.numel() * t.element_size()
            for t in st.values()
            if torch.is_tensor(t) and t.device.type == device.type and t.dim()
        )
    return {
        "num_params": n,
        "tokens_per_s": tokens / step_s,
        "tflops": model.flops_per_token(seq_len) * tokens / step_s / 1e12,
        "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "state_bytes_per_param": state / n,
        # host time waiting for gradients (issuing copies, the host adds, the last copies)
        "grad_wait_share": statistics.median(offload_s) / step_s,
        "copy_s": statistics.median(copy_s) if copy_s else 0.0,
        # the copy stream's busy time that backward hid (device clock): 1 - after / busy
        "grad_copy_hidden": 1 - statistics.median(copy_tail_s) / statistics.median(copy_s)
        if copy_tail_s and statistics.median(copy_s) > 0
        else float("nan"),
    }


def fits(side: str, layers: int, args) -> dict | None:
    """One run in a fresh process (`args`: width, seq_len, micro_batch, steps, device_gib,
    probe_timeout); None when it does not fit (or fails: the error is shown)."""
    extra = ["--device-gib", str(args.device_gib)] if args.device_gib else []
    try:
        return run_isolated(
            "benchmarks.gpu_offload",
            [
                *("--one", side, "--layers", str(layers), "--width", str(args.width)),
                *("--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch)),
                *("--steps", str(args.steps), *extra),
            ],
            timeout_s=args.probe_timeout,
        )
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        if "out of memory" not in str(e).lower():
            print(str(e)[-800:], file=sys.stderr)
        return None


def largest(side: str, args, start: int) -> dict:
    """The most layers whose steps run, bracketed from the planner's prediction `start`:
    up (or down) in steps of an eighth of it, then bisection, in at most `args.probes`
    probes. Returns the largest depth that ran, the smallest that did not, and the run."""
    lo, hi, best, probes = 0, args.max_layers + 1, None, []  # lo runs, hi does not
    guess = max(1, min(start, args.max_layers))
    step = max(1, start // 8)
    while hi - lo > 1 and len(probes) < args.probes:
        t0 = time.perf_counter()
        res = fits(side, guess, args)
        probes.append({"layers": guess, "fits": res is not None,
                       "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(f"{side}: {guess} layers {'fits' if res else 'does not fit'}", file=sys.stderr)
        if res:
            lo, best = guess, res
        else:
            hi = guess
        if best is None and hi - lo > 1:  # nothing ran yet: go down
            guess = max(lo + 1, guess - step) if guess - step > lo else (lo + hi) // 2
        elif hi > args.max_layers and lo == guess:  # no failure yet: go up
            guess = min(args.max_layers, guess + step)
        else:
            guess = (lo + hi) // 2
    return {"layers": lo, "fails_at": hi if hi <= args.max_layers else None,
            "predicted": start, "probes": probes, **(best or {})}  # fmt: skip


def with_planner(side: str, res: dict, args, vocab: int) -> dict:
    """The planner's device bytes for the run beside its measured peak."""
    from slipstream.offload.estimate import Hardware, estimate

    if "num_params" not in res:
        return res
    hw = Hardware(device_bytes=1e15, host_bytes=1e15, device_flops=1e15)
    gib = estimate(side, workload(res["layers"], args, vocab, side), hw).device_bytes / 2**30
    res["planner_device_gib"] = gib
    res["planner_error"] = gib / res["peak_device_gib"] - 1 if res["peak_device_gib"] else None
    return res


def table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(
        f"{'side':<12}{'layers':>7}{'params M':>10}{'tokens/s':>10}{'TFLOPS':>8}{'peak GiB':>10}"
        f"{'planner GiB':>13}{'B/param':>9}{'grad wait':>11}{'copy hidden':>13}"
    )
    for side, r in rows.items():
        note = f"  (fails at {r['fails_at']}; planner: {r['predicted']})" if "probes" in r else ""
        if "num_params" not in r:
            print(f"{side:<12}{'none fits' if 'probes' in r else 'failed':>7}{note}")
            continue
        print(
            f"{side:<12}{r['layers']:>7}{r['num_params'] / 1e6:>10,.0f}{r['tokens_per_s']:>10,.0f}"
            f"{r['tflops']:>8.1f}{r['peak_device_gib']:>10.2f}{r['planner_device_gib']:>13.2f}"
            f"{r['state_bytes_per_param']:>9.1f}{r['grad_wait_share']:>11.0%}"
            f"{r['grad_copy_hidden']:>13.0%}{note}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=RUN_SIDES)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-layers", type=int, default=96)
    ap.add_argument("--device-gib", type=float, default=0.0, help="cap on device memory")
    ap.add_argument("--probes", type=int, default=4, help="runs per side in the search")
    ap.add_argument("--probe-timeout", type=float, default=600.0)
    ap.add_argument(
        "--throughput-layers", type=int, default=24,
        help="part 2: this depth, plain / offload / offload+dpu, on the whole device (0: skip)",
    )  # fmt: skip
    ap.add_argument("--throughput-seq-len", type=int, default=2048)
    ap.add_argument("--throughput-micro-batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on CPU")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.width, args.seq_len, args.micro_batch, args.max_layers = 128, 64, 2, 3
        args.steps, args.device_gib, args.throughput_layers = 2, 0.0, 2
        args.throughput_seq_len, args.throughput_micro_batch = 64, 2
    if args.one:
        res = one_run(
            args.one, args.layers, args.width, args.seq_len, args.micro_batch, args.steps,
            args.device_gib,
        )  # fmt: skip
        print(json.dumps(res))
        return
    import torch

    cuda = torch.cuda.is_available()
    vocab = _vocab(cuda)
    if args.device_gib:
        budget = args.device_gib * 2**30
    elif cuda:
        budget = torch.cuda.get_device_properties(0).total_memory
    else:  # the smoke run: a budget that holds its tiny models
        budget = 2**30
    out: dict = {"largest": {}, "throughput": {}}

    def save() -> None:  # after each part: a run cut short keeps what it measured
        if args.json:
            args.json.write_text(
                json.dumps(
                    {**provenance(), "args": {k: str(v) for k, v in vars(args).items()}, **out},
                    indent=2,
                )
            )

    for side in SIDES:
        start = predicted_layers(side, args, budget, vocab)
        print(
            f"{side}: the planner predicts {start} layers in {budget / 2**30:.1f} GiB",
            file=sys.stderr,
        )
        out["largest"][side] = with_planner(side, largest(side, args, start), args, vocab)
        save()
    if args.throughput_layers:
        tp = argparse.Namespace(**{**vars(args), "device_gib": 0.0,
                                   "seq_len": args.throughput_seq_len,
                                   "micro_batch": args.throughput_micro_batch})  # fmt: skip
        for side in RUN_SIDES:
            res = fits(side, args.throughput_layers, tp) or {}
            out["throughput"][side] = with_planner(
                side, {"layers": args.throughput_layers, **res}, tp, vocab
            )
            save()
    cap = f"{args.device_gib:g} GiB of device memory" if args.device_gib else "the whole device"
    table(
        f"1. largest: width {args.width}, {args.micro_batch} x {args.seq_len} tokens, {cap}",
        out["largest"],
    )
    big = out["largest"]
    if "num_params" in big["plain"] and "num_params" in big["offload"]:
        ratio = big["offload"]["num_params"] / big["plain"]["num_params"]
        print(f"offload trains {ratio:.1f}x the parameters")
    if out["throughput"]:
        table(
            f"2. throughput: {args.throughput_layers} layers, {args.throughput_micro_batch} x "
            f"{args.throughput_seq_len} tokens per step, the whole device",
            out["throughput"],
        )


if __name__ == "__main__":
    main()
