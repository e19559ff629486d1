"""Training with and without the offload engine on CPU: tokens/s and peak memory of the same
GPT trained plain (fp32 weights, torch's fused AdamW), with `optim.offload` (bf16 working
weights, fp32 masters and moments stepped by HostAdamW), and with the delayed update as well
(the host step overlaps the next forward and backward) and with early bucket steps (no
clipping: each bucket steps as its gradient completes), with the memory planner's estimate
beside each measurement, and the step-time model's prediction beside each offload step; and ZeRO-2 offload over 2 data-parallel ranks (gloo, under torchrun,
each rank with its own batch of the same size: the job's tokens/s, and each rank's memory
against the planner's estimate for one rank of 2).

On a CPU the "device" and the host are the same memory. Two measurements, both from just
before the model is built, against the planner's device + host bytes:
- live: the peak of the bytes malloc has handed out and not taken back (glibc's `mallinfo2`:
  in-use heap plus mmapped blocks), plus the offload engine's huge-page buffers, which it maps
  itself (`offload/hostmem.py`): the CPU's counterpart of `torch.cuda.max_memory_allocated`,
  which is what the planner models;
- RSS: the process's peak resident memory growth, which adds what the allocator keeps after a
  free (glibc keeps freed heap pages, as CUDA's caching allocator keeps freed blocks). Each side runs in a fresh process, several times; the batch is random token ids (the
data plane is not what is measured here).

    python -m benchmarks.offload_train [--layers 8] [--width 512] [--steps 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import ROOT, provenance, run_isolated

SIDES = ("plain", "offload", "offload+early", "offload+dpu", "zero2")
MODE = {"offload": "plain", "offload+early": "early", "offload+dpu": "delayed"}
ZERO2_RANKS = 2  # zero2: offload with its state sharded over 2 data-parallel ranks (gloo)
VOCAB, SEQ_LEN, MICRO_BATCH = 2048, 128, 4
WARMUP = 3


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def malloc_live() -> int:
    """Bytes malloc has handed out and not taken back (in-use heap plus mmapped blocks), and
    the huge-page buffers the offload engine maps itself."""
    from slipstream.offload import hostmem

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd + hostmem.live_bytes()


def measure(side: str, layers: int, width: int, steps: int) -> dict:
    import psutil
    import torch
    import torch.nn.functional as F

    from slipstream.models import GPT, GPTConfig
    from slipstream.offload.estimate import Hardware, Workload, estimate, step_time
    from slipstream.offload.host_adam import measure_host_bandwidth
    from slipstream.tools.memory import saved_activation_bytes
    from slipstream.train.optim import OptimConfig, build_optimizer

    zero2 = side == "zero2"
    group = None
    if zero2:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        group = dist.group.WORLD
    me = psutil.Process()
    base, live_base = me.memory_info().rss, malloc_live()
    peak, peak_live, done = [base], [live_base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            peak_live[0] = max(peak_live[0], malloc_live())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    model_cfg = GPTConfig(
        vocab_size=VOCAB, n_layer=layers, n_head=width // 64, d_model=width, max_seq_len=SEQ_LEN
    )
    model = GPT(model_cfg)
    cfg = OptimConfig(
        lr=1e-3,
        offload=side != "plain",
        delayed_update=side == "offload+dpu",
        grad_clip=0.0 if side == "offload+early" else 1.0,
        delayed_update_start=WARMUP - 1,
    )
    opt = build_optimizer(model, cfg, torch.device("cpu"), group, group)
    # The fp32 model was cast to bf16 (offload): hand its freed pages back to the OS, so RSS
    # measures live memory rather than glibc's leftovers.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rank = group.rank() if zero2 else 0
    x = torch.randint(
        0, VOCAB, (MICRO_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(rank)
    )
    max_norm = float("inf") if side == "offload+early" else 1.0  # early steps: no clipping

    def forward_backward() -> None:
        # As the trainer's loss does: the logits are not held through backward.
        F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten()).backward()

    times, host_s = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.before_backward(True)
        forward_backward()
        opt.step(max_norm)
        opt.zero_grad(set_to_none=True)
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
            host_s.append(opt.stats().get("offload/host_step_s", 0.0))
        else:
            opt.stats()
    done.set()
    predicted = None
    if side in MODE:
        # The step-time model's inputs, measured apart from the steps: the device's forward and
        # backward (the same bf16 model, no engine hooks: gradients stay in the model), and
        # the host's bandwidth for the AdamW pattern (the probe). On a CPU the "link" is a
        # memory copy, which moves each byte twice (read, then written).
        opt.flush()
        threads = opt.host.num_threads
        opt.close()
        compute = []
        for _ in range(WARMUP + 2):
            t0 = time.perf_counter()
            forward_backward()
            model.zero_grad(set_to_none=True)
            compute.append(time.perf_counter() - t0)
        compute_s = statistics.median(compute[WARMUP:])
        host_bw = measure_host_bandwidth(threads)
        predicted = (compute_s, host_bw)
    w = Workload(
        num_params=model.num_params(),
        num_layers=layers,
        width=width,
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,
        micro_batch=MICRO_BATCH,
        world_size=ZERO2_RANKS if zero2 else 1,
        act_bytes=4 if side == "plain" else 2,
        saved_bytes=saved_activation_bytes(
            model_cfg, MICRO_BATCH, SEQ_LEN, torch.float32 if side == "plain" else torch.bfloat16
        ),
    )
    # On a CPU gradients leave one parameter at a time: the largest is what is in flight.
    largest = max(p.numel() for p in model.parameters()) * (4 if side == "plain" else 2)
    if zero2:  # the whole bucket fills on the "device" before its reduce-scatter
        largest = max(b.padded for b in opt.buckets) * 2  # bf16 bytes; the planner doubles
    hw = Hardware(
        device_bytes=1e12,
        host_bytes=1e12,
        device_flops=1e12,
        bucket_bytes=largest,
        separate_device=False,
    )
    est = estimate("offload" if zero2 or side == "offload+early" else side, w, hw)
    model_s = {}
    if predicted is not None:
        compute_s, host_bw = predicted
        cpu = Hardware(device_bytes=1e12, host_bytes=1e12, device_flops=1e12,
                       host_bytes_per_s=host_bw, link_bytes_per_s=host_bw / 2,
                       separate_device=False)  # fmt: skip
        t = step_time(w, cpu, MODE[side], compute_s=compute_s)
        model_s = {"predicted_step_s": t.step_s, "predicted_host_s": t.host_s,
                   "compute_s": compute_s, "link_s": t.link_s, "host_gb_per_s": host_bw / 1e9,
                   "measured_host_s": statistics.median(host_s)}  # fmt: skip
    if zero2:
        dist.destroy_process_group()
    return {
        "rank": rank,
        "num_params": model.num_params(),
        "tokens_per_s": MICRO_BATCH * SEQ_LEN / statistics.median(times),
        "step_s": statistics.median(times),
        "step_times": times,
        **model_s,
        "peak_mib": (peak[0] - base) / 2**20,
        "peak_live_mib": (peak_live[0] - live_base) / 2**20,
        "estimate_mib": (est.device_bytes + est.host_bytes) / 2**20,
        "estimate_device_mib": est.device_bytes / 2**20,
        "estimate_host_mib": est.host_bytes / 2**20,
    }


def run_ranks(cmd: list[str]) -> dict:
    """The zero2 side under torchrun: the job's tokens/s (the slower rank's step time), and the
    larger rank's memory (each rank holds its own)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ZERO2_RANKS),
         "--standalone", "-m", "benchmarks.offload_train", *cmd],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"zero2 failed:\n{out.stderr[-3000:]}")
    # The ranks share torchrun's stdout: their lines may run together.
    ranks = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", out.stdout)]
    if len(ranks) != ZERO2_RANKS:
        raise RuntimeError(f"zero2: {len(ranks)} ranks reported, {ZERO2_RANKS} expected")
    res = {k: max(x[k] for x in ranks) for k in ranks[0] if k != "tokens_per_s"}
    res["tokens_per_s"] = ZERO2_RANKS * min(x["tokens_per_s"] for x in ranks)
    res["ranks"] = ranks
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.width, args.steps)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES:
            cmd = ["--one", side, "--layers", str(args.layers), "--width", str(args.width)]
            cmd += ["--steps", str(args.steps)]
            if side == "zero2":
                res = run_ranks(cmd)
            else:
                res = run_isolated("benchmarks.offload_train", cmd, 900)
            runs[side].append(res)
            print(
                f"repeat {r + 1}/{args.repeats} {side:>8}: {res['tokens_per_s']:,.0f} tokens/s, "
                f"live +{res['peak_live_mib']:,.0f} MiB, RSS +{res['peak_mib']:,.0f} MiB",
                file=sys.stderr,
            )
    n = runs["plain"][0]["num_params"]
    print(
        f"\nGPT {args.layers} x {args.width} ({n / 1e6:.1f}M parameters), {MICRO_BATCH} x "
        f"{SEQ_LEN} tokens per step, CPU, median of {args.repeats}"
    )
    print(
        f"{'side':<12}{'tokens/s':>10}{'planner MiB':>13}{'live MiB':>10}{'error':>7}"
        f"{'RSS MiB':>9}{'error':>7}  runs: live / RSS (MiB)"
    )
    for side, rs in runs.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        live = statistics.median(x["peak_live_mib"] for x in rs)
        rss = statistics.median(x["peak_mib"] for x in rs)
        est = rs[0]["estimate_mib"]
        each = ", ".join(f"{x['peak_live_mib']:,.0f} / {x['peak_mib']:,.0f}" for x in rs)
        print(
            f"{side:<12}{tps:>10,.0f}{est:>13,.0f}{live:>10,.0f}{est / live - 1:>+7.0%}"
            f"{rss:>9,.0f}{est / rss - 1:>+7.0%}  {each}"
        )
    print(f"zero2: {ZERO2_RANKS} ranks; tokens/s of the job, memory of one rank (the larger)")
    print("\nthe step-time model (offload/estimate.py step_time) against the measured step, from")
    print("the measured forward and backward, the host probe's bandwidth and the bytes moved:")
    print(f"{'side':<14}{'measured s':>11}{'predicted s':>12}{'error':>7}"
          f"{'host s':>8}{'predicted':>10}{'error':>7}{'compute s':>10}{'GB/s':>6}")  # fmt: skip
    for side in MODE:
        rs = runs[side]
        got = statistics.median(x["step_s"] for x in rs)
        want = statistics.median(x["predicted_step_s"] for x in rs)
        host = statistics.median(x["measured_host_s"] for x in rs)
        host_want = statistics.median(x["predicted_host_s"] for x in rs)
        print(f"{side:<14}{got:>11.3f}{want:>12.3f}{want / got - 1:>+7.0%}{host:>8.3f}"
              f"{host_want:>10.3f}{host_want / host - 1:>+7.0%}"
              f"{statistics.median(x['compute_s'] for x in rs):>10.3f}"
              f"{statistics.median(x['host_gb_per_s'] for x in rs):>6.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({**provenance(("psutil",)), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
