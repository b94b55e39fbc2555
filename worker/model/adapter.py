"""A few-shot adapter: a project's corrected images as a key-value cache, blended with the
zero-shot tag scores (Tip-Adapter, Zhang et al., ECCV 2022; docs/algorithms.md section 6).

Tip-Adapter adds ``alpha * exp(-beta * (1 - f K^T)) Y`` to CLIP's logits, with ``K`` the few-shot
images' embeddings and ``Y`` their one-hot labels. prelabel's tag scores are multi-label
probabilities that thresholds apply to, not logits, so the cache's answer is normalised into one:
the affinity-weighted share of the corrected images that hold the label, and the blend
``(1 - alpha) * score + alpha * cache`` stays a probability. Nothing trains: the cache is the
corrections themselves, so it is built in the time it takes to embed them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TipAdapter:
    keys: Tensor  # [n, E] normalised image embeddings of corrected tasks
    values: Tensor  # [n, L] 1 where the corrected task holds labels[l]
    labels: tuple[str, ...]
    alpha: float  # weight of the cache in the blend, in [0, 1]
    beta: float  # sharpness of the affinity

    def cache_scores(self, embeddings: Tensor) -> Tensor:
        """[B, E] normalised image embeddings -> [B, L]: for each label, the affinity-weighted
        share of corrected images that hold it."""
        affinity = torch.exp(-self.beta * (1 - embeddings.float() @ self.keys.float().T))
        return affinity @ self.values.float() / affinity.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def blend(self, scores: Tensor, embeddings: Tensor) -> Tensor:
        """[B, L] zero-shot scores of ``labels`` -> the adapted scores."""
        return (1 - self.alpha) * scores.float() + self.alpha * self.cache_scores(embeddings)

    def adjust(self, scores: Mapping[str, float], embedding: Tensor) -> dict[str, float]:
        """One image's scores by label name: the adapter's labels blended, any other kept."""
        if not any(label in scores for label in self.labels):
            return dict(scores)
        zero_shot = torch.tensor([[scores.get(label, 0.0) for label in self.labels]])
        blended = self.blend(zero_shot, embedding[None])[0].tolist()
        return {**scores, **{label: s for label, s in zip(self.labels, blended, strict=True) if label in scores}}
