"""DeviceAdamW: torch's AdamW behind the step-optimizer seam (`optim.py`). It owns clipping,
which under tensor parallelism needs the whole model's norm: split parameters' squares summed
over the group, the rest counted once; and the sums of gradients that saw only this rank's
rows (`TensorParallelPlan`)."""

from __future__ import annotations

import time

import torch
from torch import nn

STATE_PART = "optimizer"


class DeviceAdamW:
    def __init__(
        self,
        adamw: torch.optim.AdamW,
        params: list[nn.Parameter],
        max_norm: float,
        tp_plan=None,
        writes_state: bool = True,
    ) -> None:
        """tp_plan: the model's `TensorParallelPlan` when it is split; writes_state: whether
        this rank writes the state (one rank per replicated copy)."""
        self.adamw, self.params, self.max_norm = adamw, params, max_norm
        self.tp_plan, self.writes_state = tp_plan, writes_state
        self._comm_s = 0.0  # partial-gradient sums over the tensor-parallel group

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups

    @property
    def state(self) -> dict:
        return self.adamw.state

    def begin_step(self, lr: float) -> float:
        for group in self.adamw.param_groups:
            group["lr"] = lr
        return 1.0

    def before_backward(self, last: bool) -> None:
        pass  # the gradients stay on the device: nothing to arm

    def finish_backward(self) -> None:
        # Once per step, after the last backward: summing accumulated gradients per
        # micro-batch would count the earlier micro-batches again.
        if self.tp_plan is not None:
            t0 = time.perf_counter()
            self.tp_plan.reduce_partial_grads()
            self._comm_s += time.perf_counter() - t0

    def step(self, max_norm: float | None = None) -> float:
        max_norm = self.max_norm if max_norm is None else max_norm
        if self.tp_plan is not None:
            norm = self.tp_plan.clip_grad_norm(self.params, max_norm)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.adamw.step()
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)

    def flush(self) -> None:
        pass  # steps are synchronous

    def meters(self) -> list:
        return [("comm", lambda: self._comm_s)]

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return self.adamw.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state)

    def state_parts(self) -> dict[str, dict]:
        return {STATE_PART: self.adamw.state_dict()} if self.writes_state else {}

    def load_state_parts(self, parts) -> None:
        if STATE_PART not in parts.names():
            raise ValueError(
                f"checkpoint: no '{STATE_PART}' state for torch's AdamW (found "
                f"{parts.names() or 'none'}); was it saved with optim.offload = true? resume "
                "with the recipe it was trained with"
            )
        self.adamw.load_state_dict(parts.load(STATE_PART))

    def close(self) -> None:
        pass
