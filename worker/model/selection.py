"""From per-label scores to the tags Label Studio pre-fills, and how sure the model is."""

from __future__ import annotations


def select_tags(scores: dict[str, float], multiple: bool, threshold: float) -> tuple[tuple[str, ...], float]:
    """Return (selected labels, confidence in [0, 1]).

    Multi-label: TagCLIP's relative threshold, a label is on when its score is above
    ``min + threshold * (max - min)``, and the best label is on when none is. The confidence is
    the mean distance of each label's normalised score from that threshold: 1 when every label
    sits at an extreme, near 0 when labels hover around the cut (the tasks to review first).

    Single choice: the best label; the confidence is its relative margin over the runner-up.
    """
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    top = ranked[0][1]
    if not multiple:
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        return (ranked[0][0],), (top - runner_up) / top if top > 0 else 0.0
    low = ranked[-1][1]
    spread = top - low
    if spread <= 0:
        return (ranked[0][0],), 0.0
    cut = low + threshold * spread
    selected = tuple(label for label, s in ranked if s > cut) or (ranked[0][0],)
    reach = max(threshold, 1 - threshold) or 1.0
    confidence = sum(abs((s - low) / spread - threshold) / reach for _, s in ranked) / len(ranked)
    return selected, confidence
