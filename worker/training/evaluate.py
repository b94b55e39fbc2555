"""How good a model version is on a project's held-out corrections, and whether to promote it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.jobs import BrushControl, ChoicesControl, RegionControl, TaskResult, TrainJob
from common.labelstudio.brush import rle_to_mask
from common.labelstudio.regions import box_extent, draw_outline
from common.quality import iou_table, mean_average_precision, micro_f1
from worker.predictor import Predictor
from worker.training.corrections import Correction, mask_labels

#: Metrics the promotion gate compares, when the held-out corrections allow them.
GATED = ("tag_map", "tag_exact", "mask_miou", "box_miou")
#: Boxes are scored on a grid of this many cells a side, in fractions of the image.
BOX_GRID = 200


def evaluate(
    predictor: Predictor,
    corrections: Sequence[Correction],
    choices: Sequence[ChoicesControl],
    brushes: Sequence[BrushControl],
    regions: Sequence[RegionControl] = (),
) -> dict[str, float]:
    """Tag mAP, F1 and exact tag sets (the share of tasks whose tags need no change; per Choices
    control, averaged) and mask mIoU over the labels present (of
    brush masks and polygons), predicted by ``predictor`` on the corrections' images and scored
    against the corrections."""
    images = predictor.prepare([c.image for c in corrections])
    results, _ = predictor.run([c.task_id for c in corrections], images, choices, brushes, regions)
    metrics: dict[str, float] = {"tasks": float(len(corrections))}
    maps, f1s, exact = [], [], []
    for control in choices:
        names = [label.name for label in control.labels]
        answers = [next(a for a in r.choices if a.from_name == control.from_name) for r in results]
        scores = np.array([[a.scores[n] for n in names] for a in answers])
        truth = np.array([[n in c.tags.get(control.from_name, set()) for n in names] for c in corrections])
        predicted = np.array([[n in a.selected for n in names] for a in answers])
        if truth.any():
            maps.append(mean_average_precision(scores, truth))
        f1s.append(micro_f1(predicted, truth))
        exact.append(float((predicted == truth).all(axis=1).mean()))
    if maps:
        metrics["tag_map"] = float(np.mean(maps))
    if f1s:
        metrics["tag_f1"] = float(np.mean(f1s))
        metrics["tag_exact"] = float(np.mean(exact))
    with_masks = [(r, c) for r, c in zip(results, corrections, strict=True) if c.mask is not None]
    if mask_labels(brushes, regions) and with_masks:
        labels = with_masks[0][1].mask_labels
        table = iou_table(
            [_predicted_map(r, labels) for r, _ in with_masks], [c.mask.astype(np.int64) for _, c in with_masks],
            len(labels), ignore=255,  # inside corrected boxes no mask covers: unknown
        )  # fmt: skip
        foreground = table[1:]
        if not np.all(np.isnan(foreground)):
            metrics["mask_miou"] = float(np.nanmean(foreground))
    boxed = list(dict.fromkeys(label.name for r in regions if r.type == "rectanglelabels" for label in r.labels))
    if boxed:
        miou = _box_miou(results, corrections, boxed)
        if miou is not None:
            metrics["box_miou"] = miou
    return metrics


def _box_miou(results: Sequence[TaskResult], corrections: Sequence[Correction], labels: Sequence[str]) -> float | None:
    """Mean over labels of the IoU between predicted and corrected boxes (each label's union of
    boxes per image, summed over the images); None when no label has a box on either side."""
    ious = []
    corrected = [_by_label(c.boxes) for c in corrections]  # once: a correction may hold many boxes
    for label in labels:
        predicted = [
            _box_union([box_extent({"type": r.type, "value": r.value}) for r in result.regions
                        if r.type == "rectanglelabels" and r.label == label])
            for result in results
        ]  # fmt: skip
        truth = [_box_union(boxes.get(label, [])) for boxes in corrected]
        ious.append(iou_table(predicted, truth, classes=1)[1])
    present = [iou for iou in ious if not np.isnan(iou)]
    return float(np.mean(present)) if present else None


def _by_label(boxes: Sequence[tuple[str, tuple[float, float, float, float]]]) -> dict[str, list]:
    out: dict[str, list] = {}
    for label, box in boxes:
        out.setdefault(label, []).append(box)
    return out


def _box_union(boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
    """The union of boxes (fractions) on a ``BOX_GRID`` square, as a 0/1 class map."""
    out = np.zeros((BOX_GRID, BOX_GRID), dtype=np.int64)
    for x0, y0, x1, y1 in boxes:
        out[round(y0 * BOX_GRID) : round(y1 * BOX_GRID), round(x0 * BOX_GRID) : round(x1 * BOX_GRID)] = 1
    return out


def _predicted_map(result: TaskResult, labels: Sequence[str]) -> np.ndarray:
    """The labels a result paints (brush masks, then polygons) as one class map at its image's size."""
    out = np.zeros((result.image_height or 0, result.image_width or 0), dtype=np.int64)
    size = (out.shape[1], out.shape[0])
    for mask in result.masks:
        if mask.label in labels:
            out[rle_to_mask(mask.rle, *size)] = labels.index(mask.label) + 1
    for region in result.regions:
        if region.type == "polygonlabels" and region.label in labels:
            out[draw_outline(region.value["points"], size)] = labels.index(region.label) + 1
    return out


def judge(
    candidate: Predictor, active: Predictor, held_out: Sequence[Correction], job: TrainJob, margin: float
) -> tuple[dict[str, dict[str, float]], bool, str]:
    """Both versions measured on the held-out corrections, and the gate's verdict on the candidate."""
    with torch.inference_mode():
        scores = {
            "candidate": evaluate(candidate, held_out, job.choices, job.brushes, job.regions),
            "active": evaluate(active, held_out, job.choices, job.brushes, job.regions),
        }
    return scores, *gate(scores["candidate"], scores["active"], margin)


def gate(candidate: dict[str, float], active: dict[str, float], margin: float) -> tuple[bool, str]:
    """Promote only if the candidate is not worse than the active version by more than
    ``margin`` on every gated metric both could be measured on."""
    compared = [m for m in GATED if m in candidate and m in active and not math.isnan(candidate[m])]
    if not compared:
        return False, "no held-out correction to compare the versions on"
    worse = [
        f"{m} {candidate[m]:.3f} < {active[m]:.3f} - {margin}" for m in compared if candidate[m] < active[m] - margin
    ]
    if worse:
        return False, "worse than the active version: " + "; ".join(worse)
    return True, "not worse than the active version on " + ", ".join(compared)
