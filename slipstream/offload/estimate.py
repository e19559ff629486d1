"""The memory planner behind `slipstream memory`: device and host bytes per rank, and a step
time, for each training strategy, and the fastest one that fits.

Bytes per parameter (P parameters, W data-parallel ranks, A micro-batches per step):

| strategy | device | host |
|---|---|---|
| plain (fp32 weights, grads, Adam m and v on the device) | 12 + 4 (grads, made as activations are freed) | - |
| zero2 (bf16 weights and grads; fp32 masters and moments sharded) | 4 + 12/W | - |
| offload (bf16 weights on the device; this engine's host buffers) | 2 + buckets | 16 (W = 1), 18/W (W > 1); + 4/W if A > 1 |
| offload + DPU | 2 + buckets | 18, 22/W; + 8/W if A > 1 |

The host column is what `engine.py` allocates for this rank's slice: fp32 masters (4), two
moments (8), a bf16 copy of the new weights (2), and the staged gradient the fused host step
reads (`grads.py`: bf16, 2, with W = 1, pinned on a GPU so the device's copies land in it;
the reduced fp32 slice, 4/W, with W > 1); with accumulation the fp32 sum of the earlier
micro-steps (4/W); the delayed update doubles the gradient buffers (backward fills one while
the host steps the other). With W > 1 the gradients are reduce-scattered and the weights
all-gathered on the device, in whole-bucket fp32 transients there (twice the buckets in
flight).
Activations per layer and token (Korthikanti et al., 2022, without stored attention scores:
fused attention recomputes them): 34 * width bytes in 16-bit, 68 in fp32; with activation
checkpointing only each layer's input (2 or 4 * width bytes) is kept, plus one layer's full
set.
The loss at its backward's peak: 3 * vocab * 4 bytes per token (the fp32 log-probabilities it
saved, the gradient of those and the gradient of the logits; at 16k tokens per step and
GPT-2's vocabulary one of them is 3 GiB, which an H200 run's peak showed missing).

Step time (`step_time`): three resources, each with its own time per step:
- compute: 6 * P * tokens / device FLOP/s (8 * P with activation checkpointing, which runs
  the forward twice), or the measured forward and backward;
- the host link: the gradients out (2 bytes per parameter per micro-batch with W = 1; the
  reduced fp32 slice, 4/W, with W > 1) and the bf16 weights back (2, or 2/W before the
  device's all-gather), over the link's bandwidth;
- the host step: the bytes its pass moves per parameter (`host_pass_bytes`: 28 for a bf16
  model in one micro-batch) over the host's bandwidth for that access pattern, which the
  probe in `host_adam.measure_host_bandwidth` measures.
How they overlap depends on the mode. Plain offload (clipping on): the gradients' copies run
beside backward, then the host steps, then the weights go back. Early bucket steps (no
clipping): each bucket's host step starts when its gradient is complete, beside the rest of
backward. The delayed update: the host step of step t runs beside step t + 1's forward and
backward. Fully overlapped, the step is the largest of the three: the physical limit. When
the device is the host (a CPU), all three run on the same cores and memory: nothing
overlaps, whatever the mode.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True, slots=True)
class Workload:
    num_params: float
    num_layers: int
    width: int
    vocab_size: int
    seq_len: int
    micro_batch: int
    world_size: int = 1
    act_bytes: int = 2  # 2 in bf16, 4 in fp32
    saved_bytes: float | None = None
    """Activations autograd keeps per micro-batch, when measured for the model (`slipstream
    memory RECIPE` does, on the meta device); else the formula below."""
    saved_bytes_ckpt: float | None = None
    """The same with activation checkpointing."""
    accum_steps: int = 1
    """Micro-batches per step (gradient accumulation)."""

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.seq_len * self.micro_batch


@dataclass(frozen=True, slots=True)
class Hardware:
    device_bytes: float
    host_bytes: float
    device_flops: float  # sustained FLOP/s of the model's matmuls
    host_bytes_per_s: float = 20e9
    """The host's memory bandwidth for AdamW's access pattern (4 streams read, 3 written):
    `host_adam.measure_host_bandwidth()` on the machine that will train."""
    link_bytes_per_s: float = 25e9  # host <-> device (PCIe 4 x16 in practice)
    bucket_bytes: float = 2 * 16 * 2**20  # gradient buckets in flight on the device
    separate_device: bool = True
    """A device apart from the host (a GPU), which computes while the host steps. False on a
    CPU: the device is the host, and its phases share the cores."""


@dataclass(frozen=True, slots=True)
class StepTime:
    """One offload step's time, per resource and as the mode overlaps them (seconds)."""

    compute_s: float
    link_s: float
    host_s: float
    step_s: float
    limit_s: float  # fully overlapped: the largest of the three
    bound: str  # "compute", "link" or "host": the largest


@dataclass(frozen=True, slots=True)
class Estimate:
    strategy: str
    device_bytes: float
    host_bytes: float
    step_s: float
    fits: bool
    available: bool  # implemented in Slipstream today


STRATEGIES = ("plain", "zero2", "offload", "offload+ckpt", "offload+dpu")
NEXT = ("zero2",)  # strategies not in Slipstream yet
MODES = ("plain", "early", "delayed")  # how an offload step overlaps its host work


def activation_bytes(w: Workload, checkpointing: bool) -> float:
    """Activations kept for backward, plus what the loss holds at its backward's peak."""
    measured = w.saved_bytes_ckpt if checkpointing else w.saved_bytes
    if measured is not None:
        # The trace holds the saved fp32 log-probabilities; the loss's backward adds two
        # fp32 gradients of the same size (of the log-probabilities, then of the logits).
        return measured + 2 * w.vocab_size * 4 * w.tokens
    full = 17 * w.width * w.act_bytes  # per layer and token: 34 * width bytes in 16-bit
    # With checkpointing: each layer's input, and one layer's full set during its recompute.
    per_layer = w.width * w.act_bytes if checkpointing else full
    kept = w.num_layers * per_layer + (full if checkpointing else 0)
    return kept * w.tokens + 3 * w.vocab_size * 4 * w.tokens


def offload_host_bytes(w: Workload, delayed: bool) -> float:
    """Host bytes per parameter of the model that the offload engine allocates on one rank
    (the table above)."""
    W = w.world_size
    stage = 2 if W == 1 else 4  # the bf16 gradient; the reduced fp32 slice
    grads = stage + (4 if w.accum_steps > 1 else 0)  # plus the fp32 sum of micro-steps
    return (12 + 2 + grads * (2 if delayed else 1)) / W


def host_pass_bytes(w: Workload) -> float:
    """Bytes the host moves per parameter of the model per step: the fused step reads the
    staged gradient (2 bytes; 4 for the fp32 slice with W > 1), the master and moments (12)
    and writes them (12) and the bf16 weights (2). With A > 1 micro-batches, each but the
    last is added into the fp32 sum as it arrives (the gradient read, the sum read and
    written), and the step reads the sum too."""
    stage = 2 if w.world_size == 1 else 4
    per = stage + 24 + 2
    if w.accum_steps > 1:
        per += (w.accum_steps - 1) * (stage + 8) + 4
    return per / w.world_size


def step_time(w: Workload, hw: Hardware, mode: str = "plain", checkpointing: bool = False,
              compute_s: float | None = None) -> StepTime:  # fmt: skip
    """An offload step's time in `mode` (`MODES`). `compute_s`: the device's forward and
    backward for the step, when measured (else from the FLOP count)."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r}; use one of {', '.join(MODES)}")
    P, W, A = w.num_params, w.world_size, w.accum_steps
    if compute_s is None:
        compute_s = (8 if checkpointing else 6) * P * w.tokens * A / hw.device_flops
    host_s = host_pass_bytes(w) * P / hw.host_bytes_per_s
    out_s = (2 if W == 1 else 4 / W) * A * P / hw.link_bytes_per_s
    back_s = (2 if W == 1 else 2 / W) * P / hw.link_bytes_per_s
    link_s = out_s + back_s
    parts = {"compute": compute_s, "link": link_s, "host": host_s}
    limit = max(parts.values())
    if not hw.separate_device:  # one set of cores and memory does all of it
        step = compute_s + link_s + host_s
    elif mode == "plain":  # copies beside backward; then the host step; then the weights back
        step = max(compute_s, out_s) + host_s + back_s
    elif mode == "early":  # each bucket's host step beside the rest of backward
        forward = compute_s / (4 if checkpointing else 3)
        step = forward + max(compute_s - forward, out_s, host_s) + back_s
    else:  # the host step of step t beside step t + 1's forward and backward
        step = max(compute_s, out_s, host_s) + back_s
    return StepTime(compute_s, link_s, host_s, step, limit, max(parts, key=parts.get))


def estimate(strategy: str, w: Workload, hw: Hardware) -> Estimate:
    P, W = w.num_params, w.world_size
    ckpt = strategy == "offload+ckpt"
    act = activation_bytes(w, ckpt)
    compute_s = (8 if ckpt else 6) * P * w.tokens * w.accum_steps / hw.device_flops
    if strategy == "plain":
        # Gradients are made as backward frees the activations (and are freed after the
        # step): at the peak, the larger of the two is live, not both.
        device, host, step = 12 * P + max(act, 4 * P), 0.0, compute_s
    elif strategy == "zero2":
        device, host, step = (4 + 12 / W) * P + act, 0.0, compute_s
    elif strategy in ("offload", "offload+ckpt", "offload+dpu"):
        device = 2 * P + hw.bucket_bytes * (1 if W == 1 else 2) + act
        dpu = strategy == "offload+dpu"
        host = offload_host_bytes(w, delayed=dpu) * P
        step = step_time(w, hw, "delayed" if dpu else "plain", ckpt).step_s
    else:
        raise ValueError(f"strategy: {strategy!r}; use one of {', '.join(STRATEGIES)}")
    fits = device <= hw.device_bytes and host <= hw.host_bytes
    return Estimate(strategy, device, host, step, fits, strategy not in NEXT)


def plan(w: Workload, hw: Hardware) -> tuple[list[Estimate], Estimate | None]:
    """Every strategy, and the fastest that fits among those Slipstream has today."""
    rows = [estimate(s, w, hw) for s in STRATEGIES]
    ok = [e for e in rows if e.fits and e.available]
    return rows, min(ok, key=lambda e: e.step_s) if ok else None
