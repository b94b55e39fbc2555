"""What the few-shot learner fits on a project's corrections (docs/algorithms.md section 6):
per-label tag thresholds, a cache of corrected images for tags (``TipAdapter``) and one of
corrected regions for masks (``RegionPrototypes``).

Tags: a project's corrected images as a key-value cache, blended with the zero-shot tag scores
(Tip-Adapter, Zhang et al., ECCV 2022).

Tip-Adapter adds ``alpha * exp(-beta * (1 - f K^T)) Y`` to CLIP's logits, with ``K`` the few-shot
images' embeddings and ``Y`` their one-hot labels. prelabel's tag scores are multi-label
probabilities that thresholds apply to, not logits, so the cache's answer is normalised into one:
the affinity-weighted share of the corrected images that hold the label, and the blend
``(1 - alpha) * score + alpha * cache`` stays a probability. Nothing trains: the cache is the
corrections themselves, so it is built in the time it takes to embed them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class RegionPrototypes:
    """Masks from a project's corrected regions: each label's prototype (the mean dense feature of
    the patches annotators painted with it) is blended into its text embedding,
    ``normalize((1 - gamma) * text + gamma * prototype)`` (the learner fits gamma 1: the prototype
    alone), and the mean feature of the patches they left unlabelled competes beside the background
    words, so pixels like those stay unlabelled.

    The same idea as Tip-Adapter's cache, for pixels: nothing trains, the prototypes are the
    corrections themselves (prototype classifiers of this kind are how few-shot segmentation
    methods such as PANet use support masks)."""

    labels: tuple[str, ...]
    prototypes: Tensor  # [L, E] normalised mean dense feature of each label's corrected regions
    background: Tensor | None  # [E] normalised mean feature of corrected "no label" pixels
    gamma: float  # weight of the prototype in a label's embedding, in (0, 1] (fitted now: 1; earlier versions: 0.25-1)
    painted: tuple[str, ...]  # every label the corrected masks could hold when they were fitted
    features: str  # the dense features they are means of (``dense_kind``): others are another space

    def serves(self, features: str, labels: Sequence[str]) -> bool:
        """Whether these prototypes apply to masks of ``labels`` drawn from ``features``: the same
        dense features, and labels annotators could paint when they were fitted (the "no label"
        prototype holds the pixels they left, which may be a newer label's)."""
        return features == self.features and set(labels) <= set(self.painted)

    def blend(self, names: Sequence[str], text: Tensor) -> Tensor:
        """[n, E] text embeddings of labels ``names`` -> the embeddings masks are drawn with
        (a label without a prototype keeps its text)."""
        rows = [self.labels.index(name) if name in self.labels else -1 for name in names]
        out = F.normalize(text.float(), dim=-1)
        known = torch.tensor([r >= 0 for r in rows], device=text.device)
        if known.any():
            prototypes = self.prototypes.to(text.device).float()[[max(r, 0) for r in rows]]
            blended = F.normalize((1 - self.gamma) * out + self.gamma * prototypes, dim=-1)
            out = torch.where(known[:, None], blended, out)
        return out

    def competitors(self, device: torch.device) -> Tensor:
        """[0 or 1, E]: the "no label" prototype, a competitor for pixels (none without one)."""
        if self.background is None:
            return torch.zeros(0, self.prototypes.shape[1], device=device)
        return self.background.to(device).float()[None]


def dense_kind(head: str, sliding: bool) -> str:
    """A name for the dense features a ``DENSE_HEAD`` computes with or without sliding windows."""
    return f"{head}{'+sliding' if sliding else ''}"


@dataclass(frozen=True)
class FewShot:
    """Everything the few-shot learner fitted for a version; the empty one changes nothing."""

    thresholds: Mapping[str, float] = field(default_factory=dict)  # per label, over TAG_MIN_SCORE
    adapter: TipAdapter | None = None  # tags
    prototypes: RegionPrototypes | None = None  # training-free masks
    tag_scores: str = "tagclip"  # the TAG_SCORES the thresholds and the tag cache were fitted on

    def for_tag_scores(self, tag_scores: str) -> FewShot:
        """What applies to tags scored by ``tag_scores``: thresholds and cache fitted on other
        scores (a project that switched TAG_SCORES since) would cut them in the wrong place."""
        if tag_scores == self.tag_scores:
            return self
        return FewShot(prototypes=self.prototypes, tag_scores=tag_scores)
