"""The learning-rate schedule of training: linear warmup, then cosine, linear or no decay to a
floor (as Megatron-LM and torchtitan do).

    sched = LRSchedule(lr=3e-3, min_lr=3e-4, warmup_steps=100, decay="cosine", total_steps=5000)
    for step in range(5000):
        sched.apply(optimizer, step)      # sets every param group's lr to sched(step)
        ...

The rate is a pure function of the step, so a resumed run (which knows its step) continues
on the same curve; :meth:`state_dict` is what a checkpoint stores to check that it does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["LRSchedule", "DECAYS"]

DECAYS = ("cosine", "linear", "constant")


@dataclass(kw_only=True, frozen=True)
class LRSchedule:
    """lr(step) for steps 0 .. total_steps - 1."""

    lr: float
    """the peak rate, reached at the end of warmup"""
    total_steps: int
    """steps of the whole run: decay ends at the last one"""
    min_lr: float = 0.0
    """the floor the decay ends at"""
    warmup_steps: int = 0
    """steps of linear warmup: step s < warmup_steps runs at lr * (s + 1) / warmup_steps"""
    decay: str = "cosine"
    """after warmup: "cosine" (half a cosine from lr to min_lr), "linear", or "constant" (lr)"""

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"LRSchedule: lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"LRSchedule: min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.total_steps < 1:
            raise ValueError(f"LRSchedule: total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"LRSchedule: warmup_steps must be in [0, total_steps={self.total_steps}], "
                             f"got {self.warmup_steps}")
        if self.decay not in DECAYS:
            raise ValueError(f"LRSchedule: decay must be one of {DECAYS}, got {self.decay!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = self.total_steps - 1 - self.warmup_steps  # the decay runs from warmup_steps to the last step
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 0.0
        if self.decay == "linear":
            return self.lr - (self.lr - self.min_lr) * progress
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        """Set every param group's ``lr`` to lr(step); returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LRSchedule":
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def differences(self, other: "LRSchedule") -> list:
        """["name: mine vs other", ...] for every field that differs."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]
