"""Per-step schedules of DINO: learning rate, weight decay, teacher momentum and temperature.

All are pure functions of the global step, so a resumed run needs only the step to continue.

Examples
--------
>>> s = Schedules(total_steps=100, steps_per_epoch=10, peak_lr=1.0, min_lr=0.0, warmup_epochs=1,
...               wd_start=0.04, wd_end=0.4, momentum_start=0.996, momentum_end=1.0,
...               teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0)
>>> s.lr(0), s.lr(5), s.lr(10), round(s.lr(99), 4)
(0.0, 0.5, 1.0, 0.0003)
>>> s.momentum(0), s.weight_decay(0)
(0.996, 0.04)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedules", "cosine"]


def cosine(start: float, end: float, t: float) -> float:
    """Half-cosine from ``start`` (t = 0) to ``end`` (t = 1)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedules:
    """DINO's schedules over ``total_steps`` (warm-ups given in epochs, as the original)."""

    total_steps: int
    steps_per_epoch: int
    peak_lr: float  # already scaled by the global batch
    min_lr: float
    warmup_epochs: float
    wd_start: float
    wd_end: float
    momentum_start: float
    momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: float

    def _warmup_steps(self, epochs: float) -> int:
        return min(int(round(epochs * self.steps_per_epoch)), self.total_steps)

    def lr(self, step: int) -> float:
        """Linear warm-up from 0, then cosine down to ``min_lr``."""
        warm = self._warmup_steps(self.warmup_epochs)
        if step < warm:
            return self.peak_lr * step / warm
        span = max(1, self.total_steps - warm)
        return cosine(self.peak_lr, self.min_lr, (step - warm) / span)

    def weight_decay(self, step: int) -> float:
        """Cosine from ``wd_start`` up (or down) to ``wd_end``."""
        return cosine(self.wd_start, self.wd_end, step / self.total_steps)

    def momentum(self, step: int) -> float:
        """Teacher EMA momentum: cosine from ``momentum_start`` to ``momentum_end`` (1)."""
        return cosine(self.momentum_start, self.momentum_end, step / self.total_steps)

    def teacher_temperature(self, step: int) -> float:
        """Linear warm-up from ``warmup_teacher_temp``, then constant ``teacher_temp``."""
        warm = self._warmup_steps(self.warmup_teacher_temp_epochs)
        if step < warm:
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * (
                step / warm
            )
        return self.teacher_temp
