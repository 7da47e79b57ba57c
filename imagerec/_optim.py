"""Parameter groups and the learning-rate schedule that every imagerec training loop uses.

The classifier's two stages (``training``), the pruning fine-tune (``compress``) and the SimCLR
adaptation of a backbone (``features``) all train with weight decay on weights but not on norm
weights and biases, and with a linear warm-up then a cosine decay to 0. Both rules live here.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, peak_lr: float) -> list[dict]:
    """Two optimizer parameter groups: weights with ``weight_decay``, and norm weights and biases
    (every parameter of one dimension or none) without; empty groups are left out.

    Each group carries ``peak_lr``, the rate that :func:`set_lr` scales by the schedule.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "peak_lr": peak_lr},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "peak_lr": peak_lr},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The factor of the peak rate at ``step`` (0-based) of ``total``: a linear warm-up over
    ``warmup`` steps (none when 0), then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set each group's learning rate to its ``peak_lr`` times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
