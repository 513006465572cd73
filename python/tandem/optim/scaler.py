"""Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed Precision Training").

The loss is multiplied by ``scale`` before the backward, so that small fp16 gradients do not
flush to zero; the optimizer divides the fp32 master gradients by it again. A step whose
gradients hold inf or nan (on any rank: the ranks agree) is skipped and the scale shrinks by
``backoff_factor``; after ``growth_interval`` steps without overflow it grows by
``growth_factor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DynamicLossScaler"]


@dataclass(kw_only=True)
class DynamicLossScaler:
    """The loss scale and its rule (fields as torch.amp.GradScaler's)."""

    init_scale: float = 2.0 ** 16
    """scale of the first step"""
    growth_factor: float = 2.0
    """multiplier after ``growth_interval`` steps without overflow"""
    backoff_factor: float = 0.5
    """multiplier after a step with inf/nan gradients"""
    growth_interval: int = 1000
    """steps without overflow before the scale grows"""
    min_scale: float = 1.0
    """the scale never drops below this"""

    def __post_init__(self):
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"DynamicLossScaler: init_scale must be a finite number > 0, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"DynamicLossScaler: growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"DynamicLossScaler: backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"DynamicLossScaler: growth_interval must be an int >= 1, got {self.growth_interval!r}")
        if not 0.0 < self.min_scale <= self.init_scale:
            raise ValueError(f"DynamicLossScaler: min_scale must be in (0, init_scale], got {self.min_scale}")
        self.scale = float(self.init_scale)
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        """After a step: back off on overflow (the step was skipped), else count towards growth."""
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.good_steps = int(sd["good_steps"])
        self.skipped_steps = int(sd["skipped_steps"])
