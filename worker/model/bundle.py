"""A loaded CLIP model and what is needed to feed it: what every model function takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer


@dataclass(frozen=True)
class ClipBundle:
    """A loaded model and what is needed to feed it."""

    model: open_clip.CLIP
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    description: str
    precision: torch.dtype = torch.float32  # what the ViT computes in (under autocast when bf16)
    visual: VisionTransformer = None  # type: ignore[assignment]  # model.visual, or a trained version's

    def __post_init__(self) -> None:
        if self.visual is None:
            object.__setattr__(self, "visual", self.model.visual)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for OpenAI's weights), capped at 100 as in training."""
        return float(self.model.logit_scale.exp().clamp(max=100.0))


def autocast(bundle: ClipBundle) -> torch.autocast:
    """Autocast to the bundle's precision; a no-op in fp32."""
    return torch.autocast(bundle.device.type, dtype=torch.bfloat16, enabled=bundle.precision == torch.bfloat16)
