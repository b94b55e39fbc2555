"""What a training run reports, and the optimiser step both runs (CLIPSelf, ZegCLIP) share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TrainingReport:
    """The loss of every step of one run and its wall time."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def optimise(
        self,
        loss: Tensor,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        progress: Callable[[int, float], None] | None,
    ) -> None:
        """One optimiser and schedule step on ``loss``; the loss is recorded and passed to
        ``progress(step, loss)``."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        self.losses.append(loss.item())
        if progress is not None:
            progress(len(self.losses) - 1, self.losses[-1])
