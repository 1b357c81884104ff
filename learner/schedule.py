"""Learning-rate schedule: linear warm-up from 0, then constant, linear or cosine decay to ``lr * min_lr_ratio``."""

from __future__ import annotations

import math

import torch

from learner.config import OptimConfig


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of ``config.lr`` for optimizer step ``step`` (0-based) of ``total_steps``."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - config.warmup_steps - 1, 1)
    progress = min(max(step - config.warmup_steps, 0) / decay_steps, 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
