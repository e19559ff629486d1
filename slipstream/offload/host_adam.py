"""HostAdamW: AdamW over fp32 host tensors, in one pass per tensor, multi-threaded.

- It sets its own thread count (`num_threads`, default: the CPUs this process may use), since
  torchrun sets OMP_NUM_THREADS=1 and an optimizer stepping on one thread is several times
  slower.
- The gradient is read where it was staged, in the model's dtype, plus the fp32 sum of
  earlier micro-steps when there is one (`step(sources=...)`); the gradient scale (clipping
  coefficient, loss-scale inverse) is applied in the same pass, and so is the copy-out of the
  updated weights to bf16 (`step(bf16_out=...)`), which a separate cast would pay for with a
  second sweep over memory.
- The same bits for any thread count; the same math as `torch.optim.AdamW` (decoupled weight
  decay, bias corrections), which the tests hold it to.

State per parameter is torch's own (`step`, `exp_avg`, `exp_avg_sq`), so `state_dict()` has
torch's layout. Without a C compiler the step runs as torch ops (same math, slower).
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from slipstream.offload import adamw_kernel as kernel
from slipstream.offload.hostmem import host_empty, host_zeros


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class HostAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        num_threads: int = 0,
        use_kernel: bool = True,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"HostAdamW: invalid lr {lr}, betas {betas}, eps {eps} or decay")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
                    raise ValueError(
                        "HostAdamW: parameters must be contiguous fp32 CPU tensors (the host "
                        f"masters); got {p.dtype} on {p.device}"
                    )
        self.num_threads = num_threads or default_threads()
        self._lib = kernel.load() if use_kernel else None
        self.busy_s = 0.0  # seconds spent in step(), in total (the engine reports it per step)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, then the moments moved into huge pages, where a fresh step puts them."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st and st[key].device.type == "cpu":
                    st[key] = _zeros_like(st[key]).copy_(st[key])

    @property
    def uses_kernel(self) -> bool:
        return self._lib is not None

    def _fits(self, *ts: torch.Tensor | None) -> bool:
        """Whether the kernel reads these: host tensors of one length, contiguous, of a
        dtype it knows (None: absent)."""
        real = [t for t in ts if t is not None]
        return (
            self._lib is not None
            and all(t.device.type == "cpu" and t.is_contiguous() for t in real)
            and all(kernel.kind(t) is not None for t in real)
            and len({t.numel() for t in real}) == 1
        )

    @torch.no_grad()
    def add_grad(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst += src: a micro-step's gradient into its fp32 sum. Through the kernel for bf16,
        fp16 and fp32 (the same bits as `add_`: the conversion is exact; about 5x faster than
        torch's mixed-dtype add on 2 cores: benchmarks/results/2026-11-30-grad-add.md)."""
        if dst.dtype == torch.float32 and src.shape == dst.shape and self._fits(dst, src):
            k = kernel.kind(src)
            self._lib.grad_add(dst.data_ptr(), src.data_ptr(), k, dst.numel(), self.num_threads)
        else:
            dst.add_(src)

    @torch.no_grad()
    def sumsq(self, g: torch.Tensor, acc: torch.Tensor | None = None) -> float:
        """The sum of squares of acc + g (g alone without acc), in double, the same for any
        thread count."""
        if self._fits(g, acc) and (acc is None or acc.dtype == torch.float32):
            acc_ptr = None if acc is None else acc.data_ptr()
            return self._lib.grad_sumsq(g.data_ptr(), kernel.kind(g), acc_ptr, g.numel(),
                                        self.num_threads)  # fmt: skip
        x = g.float() if acc is None else acc.reshape(g.shape) + g.float()
        return float(x.double().square().sum())

    @torch.no_grad()
    def stage(self, stage: torch.Tensor, src: torch.Tensor, acc: torch.Tensor | None,
              fold: bool) -> float:  # fmt: skip
        """stage = src (a micro-step's gradient into its staging slot, in its own dtype),
        after acc += stage when `fold` (the slot held an earlier micro-step); returns the sum
        of squares of acc + src: one pass."""
        same = src.dtype == stage.dtype and src.numel() == stage.numel()
        if same and self._fits(stage, src, acc) and (acc is None or acc.dtype == torch.float32):
            acc_ptr = None if acc is None else acc.data_ptr()
            return self._lib.stage_grad(stage.data_ptr(), kernel.kind(stage), src.data_ptr(),
                                        acc_ptr, int(fold), stage.numel(), self.num_threads)  # fmt: skip
        if fold:
            assert acc is not None
            acc.add_(stage.reshape(acc.shape))
        stage.copy_(src.reshape(stage.shape))
        return self.sumsq(stage, acc)

    @torch.no_grad()
    def grad_sq_norm(self, only: set[torch.Tensor] | None = None) -> float:
        """Sum of squares of every gradient (of those in `only`, if given), the same for any
        thread count."""
        return sum(
            self.sumsq(p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and (only is None or p in only)
        )

    @torch.no_grad()
    def step(
        self,
        closure=None,
        grad_scale: float = 1.0,
        bf16_out: dict[torch.Tensor, torch.Tensor] | None = None,
        only: set[torch.Tensor] | None = None,
        lrs: list[float] | None = None,
        sources: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ):
        """One AdamW step on every parameter with a gradient (of those in `only`, if given).
        `grad_scale` multiplies each gradient first; `bf16_out[p]` (a bf16 tensor shaped like
        p) receives the new weights. `lrs`: each group's learning rate as it was when the step
        was launched (a step in a background thread must not see the next step's).
        `sources[p] = (g, acc)`: p's gradient is acc + g, read where it was staged (g in the
        model's dtype, acc the fp32 sum of earlier micro-steps or None), in the step's own
        pass; then p.grad is not read."""
        loss = closure() if closure is not None else None
        t0 = time.perf_counter()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr = group["lr"] if lrs is None else lrs[gi]
            for p in group["params"]:
                if only is not None and p not in only:
                    continue
                g, acc = sources[p] if sources is not None and p in sources else (p.grad, None)
                if g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = _zeros_like(p)
                    state["exp_avg_sq"] = _zeros_like(p)
                state["step"] += 1
                step = int(state["step"])
                out = None if bf16_out is None else bf16_out.get(p)
                self._update(p, g, acc, state, group, lr, (beta1, beta2), step, grad_scale, out)
        self.busy_s += time.perf_counter() - t0
        return loss

    def _update(self, p, g, acc, state, group, lr, betas, step, grad_scale, out) -> None:
        (beta1, beta2), wd, eps = betas, group["weight_decay"], group["eps"]
        bc1 = 1 - beta1**step
        bc2_sqrt = math.sqrt(1 - beta2**step)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if out is not None and (out.dtype != torch.bfloat16 or out.shape != p.shape):
            raise ValueError("HostAdamW: bf16_out tensors must be bf16 and shaped like p")
        if out is not None and not out.is_contiguous():
            raise ValueError("HostAdamW: bf16_out tensors must be contiguous")
        if self._fits(p, g, acc) and (acc is None or acc.dtype == torch.float32):
            self._lib.adamw_fused(
                *(t.data_ptr() for t in (p, m, v, g)),
                kernel.kind(g),
                None if acc is None else acc.data_ptr(),
                None if out is None else out.data_ptr(),
                p.numel(),
                lr,
                beta1,
                beta2,
                eps,
                wd,
                bc1,
                bc2_sqrt,
                grad_scale,
                self.num_threads,
            )
            return
        full = (
            g.float().reshape(p.shape)
            if acc is None
            else acc.reshape(p.shape) + g.float().reshape(p.shape)
        )
        torch_adamw_step(p, full * grad_scale, m, v, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt)
        if out is not None:
            out.copy_(p)


def _zeros_like(p: torch.Tensor) -> torch.Tensor:
    """Moments: in huge pages on the host (hostmem.py), the step streams them every time."""
    if p.device.type != "cpu":
        return torch.zeros_like(p)
    return host_zeros(p.numel(), p.dtype).view(p.shape)


def torch_adamw_step(p, g, m, v, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt) -> None:
    """The kernel's math in torch ops (the fallback without a C compiler)."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)


def measure_host_bandwidth(num_threads: int = 0, numel: int = 2**25, repeats: int = 5) -> float:
    """This host's memory bandwidth for AdamW's access pattern, bytes/s: 4 fp32 streams read
    and 3 written (28 bytes per element) with trivial math, on the huge pages the engine's
    buffers use; the median of `repeats` passes after one warm-up. 2**25 elements (512 MiB in
    all) are well past any cache. Without the kernel (no C compiler), torch's in-place adds
    over the same streams."""
    threads = num_threads or default_threads()
    p, g, m, v = (host_empty(numel).fill_(1.0) for _ in range(4))
    lib = kernel.load()

    def one_pass() -> None:
        if lib is not None:
            lib.access_probe(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), numel,
                             threads)  # fmt: skip
        else:
            m.add_(g), v.add_(g), p.sub_(g)

    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        one_pass()
        if i:
            times.append(time.perf_counter() - t0)
    return 28 * numel / statistics.median(times)
