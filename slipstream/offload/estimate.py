"""The memory planner behind `slipstream memory`: device and host bytes per rank, and a step
time, for each training strategy, and the fastest one that fits.

Bytes per parameter (P parameters, W data-parallel ranks):

| strategy | device | host |
|---|---|---|
| plain (fp32 weights, grads, Adam m and v on the device) | 12 + 4 (grads, made as activations are freed) | - |
| zero2 (bf16 weights and grads; fp32 masters and moments sharded) | 4 + 12/W | - |
| offload (bf16 weights on the device; this engine's host buffers) | 2 + buckets | 18/W (+ 2 or 4/W) |
| offload + DPU | 2 + buckets | 22/W (+ 2 or 4/W) |

The host column is what `engine.py` allocates, all of it for this rank's slice only: the fp32
gradient (4), fp32 masters (4), two moments (8) and a bf16 copy of the new weights (2); with
the delayed update a second gradient buffer (4), which backward fills while the host steps the
first; on a GPU, pinned staging for the gradients' copies (2 with W = 1: the whole gradient in
bf16; 4/W with W > 1: the reduced fp32 slice), which a CPU needs not. With W > 1 the gradients
are reduce-scattered and the weights all-gathered on the device, in whole-bucket fp32
transients there (twice the buckets in flight).
Activations per layer and token (Korthikanti et al., 2022, without stored attention scores:
fused attention recomputes them): 34 * width bytes in 16-bit, 68 in fp32; with activation
checkpointing only each layer's input (2 or 4 * width bytes) is kept, plus one layer's full
set.
The loss at its backward's peak: 3 * vocab * 4 bytes per token (the fp32 log-probabilities it
saved, the gradient of those and the gradient of the logits; at 16k tokens per step and
GPT-2's vocabulary one of them is 3 GiB, which an H200 run's peak showed missing).

Step time: compute = 6 * P * tokens / device FLOP/s (8 * P with activation checkpointing, which
runs the forward twice); the host step moves 30 bytes per parameter of its slice at the host
AdamW rate; copies move 2 bytes per parameter each way over the host link (W > 1: 4/W to the
host, the reduced fp32 slice, and 2/W back). Offload adds the
host step and the copies to the step; the delayed update (DPU) overlaps them with the next
step's compute, so the step is the larger of the two.
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

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


@dataclass(frozen=True, slots=True)
class Hardware:
    device_bytes: float
    host_bytes: float
    device_flops: float  # sustained FLOP/s of the model's matmuls
    host_adam_params_per_s: float = 1.6e9  # measured: benchmarks/results/*-host-adam.md
    link_bytes_per_s: float = 25e9  # host <-> device (PCIe 4 x16 in practice)
    bucket_bytes: float = 2 * 16 * 2**20  # gradient buckets in flight on the device
    # A device apart from the host (a GPU): gradients land in pinned staging buffers on the
    # host (2 bytes per parameter) before their fp32 add. False on a CPU.
    separate_device: bool = True


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


def estimate(strategy: str, w: Workload, hw: Hardware) -> Estimate:
    P, W = w.num_params, w.world_size
    ckpt = strategy == "offload+ckpt"
    act = activation_bytes(w, ckpt)
    compute_s = (8 if ckpt else 6) * P * w.tokens / hw.device_flops
    if strategy == "plain":
        # Gradients are made as backward frees the activations (and are freed after the
        # step): at the peak, the larger of the two is live, not both.
        device, host, step = 12 * P + max(act, 4 * P), 0.0, compute_s
    elif strategy == "zero2":
        device, host, step = (4 + 12 / W) * P + act, 0.0, compute_s
    elif strategy in ("offload", "offload+ckpt", "offload+dpu"):
        device = 2 * P + hw.bucket_bytes * (1 if W == 1 else 2) + act
        per_param = (22 if strategy == "offload+dpu" else 18) / W
        staging = (2 if W == 1 else 4 / W) if hw.separate_device else 0
        host = (per_param + staging) * P
        host_step = P / W / hw.host_adam_params_per_s
        copies = (4 if W == 1 else 6 / W) * P / hw.link_bytes_per_s
        if strategy == "offload+dpu":
            step = max(compute_s, host_step + copies)
        else:
            step = compute_s + host_step + copies
    else:
        raise ValueError(f"strategy: {strategy!r}; use one of {', '.join(STRATEGIES)}")
    fits = device <= hw.device_bytes and host <= hw.host_bytes
    return Estimate(strategy, device, host, step, fits, strategy not in NEXT)


def plan(w: Workload, hw: Hardware) -> tuple[list[Estimate], Estimate | None]:
    """Every strategy, and the fastest that fits among those Slipstream has today."""
    rows = [estimate(s, w, hw) for s in STRATEGIES]
    ok = [e for e in rows if e.fits and e.available]
    return rows, min(ok, key=lambda e: e.step_s) if ok else None
