"""Learning-rate schedule: linear warm-up, then cosine decay from lr to lr_final over the stage."""

from __future__ import annotations

import math

from sedit.config import StageConfig


def learning_rate(step: int, stage: StageConfig) -> float:
    """lr(step) = lr * (step+1)/warmup during warm-up, then lr_final + (lr - lr_final)(1 + cos(pi t))/2."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    decay_steps = max(1, stage.steps - stage.warmup_steps)
    t = min(1.0, (step - stage.warmup_steps) / decay_steps)
    return stage.lr_final + (stage.lr - stage.lr_final) * 0.5 * (1 + math.cos(math.pi * t))
