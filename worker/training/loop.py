"""The one training loop every trainer runs (CLIPSelf, ZegCLIP): AdamW, a linear warm-up over
the first tenth then a decay, progress after every step, and a cancel checked before every step.

A trainer supplies the parameter groups and a function that returns one batch's loss; the loop
owns the optimiser, the schedule and the bookkeeping, so every trainer honours a cancel the same
way and reports the same figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: Called with (step, loss) after every optimiser step.
Progress = Callable[[int, float], None]
#: Asked before every step; True stops the run.
ShouldStop = Callable[[], bool]

#: How the learning rate decays after the warm-up: CLIPSelf's cosine, ZegCLIP's polynomial (0.9).
DECAYS: dict[str, Callable[[int, int], float]] = {
    "cosine": lambda step, steps: 0.5 * (1 + math.cos(math.pi * step / steps)),
    "poly": lambda step, steps: (1 - step / steps) ** 0.9,
}


class TrainingCancelled(Exception):
    """The training run was asked to stop; nothing is saved."""


@dataclass
class TrainingReport:
    """The loss of every step of one run and its wall time."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and embeddings' 1-D tensors are left alone."""
    params = list(params)
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def check_stop(should_stop: ShouldStop | None, where: str) -> None:
    """Raise ``TrainingCancelled`` when the run was asked to stop (between stages, and per step)."""
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"stopped {where}")


def train(
    batch_loss: Callable[[int], Tensor],
    groups: Sequence[dict],
    steps: int,
    lr: float,
    decay: str,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> TrainingReport:
    """Run ``steps`` optimiser steps on ``batch_loss(step)`` over the parameter ``groups``."""
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = max(1, steps // 10)
    shape = DECAYS[decay]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * shape(s, steps))
    report = TrainingReport(steps=steps)
    started = time.perf_counter()
    for step in range(steps):
        check_stop(should_stop, f"at step {step}")
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        report.losses.append(loss.item())
        if progress is not None:
            progress(step, report.losses[-1])
    report.seconds = time.perf_counter() - started
    return report
