"""Dynamic loss scaling for fp16 models: the loss is multiplied by `scale` so that small
gradients survive fp16; a step whose gradients overflow is skipped (no update, no Adam step)
and the scale halved; after `growth_interval` clean steps it doubles. bf16 and fp32 models
keep a scale of 1."""

from __future__ import annotations

import math


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.growth_interval = enabled, growth_interval
        self.scale = init_scale if enabled else 1.0
        self.clean_steps = 0

    def update(self, norm: float) -> bool:
        """After the norm of a step's (unscaled) gradients is known, before anything else
        changes the scale: False when the step must be skipped (an overflow, scale halved).
        The caller unscales with the scale read before this call."""
        if not self.enabled:
            return True
        if not math.isfinite(norm):
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
            return False
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale, self.clean_steps = self.scale * 2, 0
        return True

    def state_dict(self) -> dict:
        return {"loss_scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["loss_scale"]), int(state["clean_steps"])
