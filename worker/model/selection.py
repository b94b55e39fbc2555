"""From per-label scores to the tags Label Studio pre-fills, and how sure the model is."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: The decision rules (``TAG_RULE``): ``absolute`` for projects, ``relative`` for TagCLIP's benchmarks.
TAG_RULES = ("absolute", "relative")


@dataclass(frozen=True)
class TagRule:
    """How scores become tags.

    ``absolute``: a label is on when its score reaches its threshold: ``per_label`` when the
    project's corrections fitted one, else ``min_score``. Scores are probabilities against every
    competitor (the other labels, background words and distractor concepts), so a label can be
    off on every image and any number of labels, none included, can be on.

    ``relative``: TagCLIP's rule, on when above ``min + relative * (max - min)`` of the control's
    own scores. Made for 20-80 benchmark classes: with n labels at most n - 1 are on (one when
    n = 2) and at least one always is, so it is kept for comparisons with the paper only.
    """

    kind: str = "absolute"
    min_score: float = 0.15
    relative: float = 0.5
    per_label: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TAG_RULES:
            raise ValueError(f"unknown tag rule {self.kind!r}; expected one of {', '.join(TAG_RULES)}")

    def threshold(self, label: str) -> float:
        return self.per_label.get(label, self.min_score)


def select_tags(scores: Mapping[str, float], multiple: bool, rule: TagRule) -> tuple[tuple[str, ...], float]:
    """Return (selected labels, best first; confidence in [0, 1]).

    The confidence is how far the labels sit from their cut, on average, in [0, 1]: 1 when every
    label is at an extreme, near 0 when they hover around it (the tasks to review first).
    Single choice: the best label (under the absolute rule, only if it reaches its threshold);
    the confidence is its relative margin over the runner-up.
    """
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if not ranked:
        return (), 0.0
    if not multiple:
        (best, top), runner_up = ranked[0], ranked[1][1] if len(ranked) > 1 else 0.0
        margin = (top - runner_up) / top if top > 0 else 0.0
        on = rule.kind == "relative" or top >= rule.threshold(best)
        return ((best,), margin) if on else ((), margin)
    if rule.kind == "absolute":
        selected = tuple(label for label, s in ranked if s >= rule.threshold(label))
        distance = [abs(s - rule.threshold(label)) / max(rule.threshold(label), 1 - rule.threshold(label))
                    for label, s in ranked]  # fmt: skip
        return selected, sum(distance) / len(distance)
    top, low = ranked[0][1], ranked[-1][1]
    spread = top - low
    if spread <= 0:
        return (ranked[0][0],), 0.0
    cut = low + rule.relative * spread
    selected = tuple(label for label, s in ranked if s > cut) or (ranked[0][0],)
    reach = max(rule.relative, 1 - rule.relative) or 1.0
    confidence = sum(abs((s - low) / spread - rule.relative) / reach for _, s in ranked) / len(ranked)
    return selected, confidence
