"""How good predictions are: the figures the correction report, the promotion gate and the
benchmarks share (numpy only, so the backend can use them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: A predicted mask this close to the final one counts as accepted as it was.
UNCHANGED_IOU = 0.99


def accepted_unchanged(tags_added: int, tags_removed: int, ious: Iterable[float]) -> bool:
    """Whether an annotator accepted a pre-label as it was: no tag added or removed, and every
    mask, box and polygon within UNCHANGED_IOU of the final one. The one definition that the
    correction report, the promotion gate's readers and the benchmarks use."""
    return tags_added == 0 and tags_removed == 0 and all(iou >= UNCHANGED_IOU for iou in ious)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks of one size; 1.0 when both are empty."""
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of the ranking average precision."""
    aps = []
    for c in range(scores.shape[1]):
        if not truth[:, c].any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = truth[order, c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps))


def micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    tp = (predicted & truth).sum()
    precision = tp / max(1, predicted.sum())
    recall = tp / max(1, truth.sum())
    return float(2 * precision * recall / (precision + recall)) if tp else 0.0


def iou_table(
    predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], classes: int, ignore: int | None = None
) -> np.ndarray:
    """Per-class IoU over a dataset of class maps (0 = background, 1..classes); NaN when absent.
    Pixels whose truth is ``ignore`` (no supervision there) are left out."""
    confusion = np.zeros((classes + 1, classes + 1), dtype=np.int64)
    for p, t in zip(predicted, truth, strict=True):
        if ignore is not None:
            known = t != ignore
            p, t = p[known], t[known]
        confusion += np.bincount(t.ravel() * (classes + 1) + p.ravel(), minlength=(classes + 1) ** 2).reshape(
            classes + 1, classes + 1
        )
    inter = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def miou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], classes: int) -> float:
    return float(np.nanmean(iou_table(predicted, truth, classes)))
