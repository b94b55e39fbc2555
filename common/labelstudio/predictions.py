"""Turn a job's results into Label Studio 1.23.2 predictions (PROTOCOL.md section 4)."""

from __future__ import annotations

import logging
from typing import Any

from common.jobs import PredictResult, TaskResult
from common.labelstudio.config import LabelSpec

log = logging.getLogger(__name__)


def to_label_studio(result: PredictResult, spec: LabelSpec, model_version: str) -> list[Any]:
    """One item per task, in order. A failed task gets an empty list: Label Studio then stores no
    prediction for it, so the next "Retrieve Predictions" tries that task again.

    A task's ``score`` is the mean of its tag confidences and mask scores: low scores mark the
    tasks most worth a human look."""
    return [_task_prediction(task, spec, model_version) for task in result.tasks]


def _task_prediction(task: TaskResult, spec: LabelSpec, model_version: str) -> dict[str, Any] | list[Any]:
    if task.error is not None:
        log.warning("task %s: no prediction: %s", task.task_id, task.error)
        return []
    items = [
        {
            "id": f"{control.from_name}-{task.task_id}",
            "from_name": control.from_name,
            "to_name": spec.image_name,
            "type": "choices",
            "value": {"choices": list(control.selected)},
            "score": round(control.score, 4),
        }
        for control in task.choices
        if control.selected  # none of the labels: no result (a choices result must choose)
    ]
    items += [
        {
            "id": f"{mask.from_name}-{task.task_id}-{i}",
            "from_name": mask.from_name,
            "to_name": spec.image_name,
            "type": "brushlabels",
            "original_width": task.image_width,
            "original_height": task.image_height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask.rle, "brushlabels": [mask.label]},
            "score": round(mask.score, 4),
        }
        for i, mask in enumerate(task.masks)
    ]
    items += [
        {
            "id": f"{region.from_name}-{task.task_id}-{i}",
            "from_name": region.from_name,
            "to_name": spec.image_name,
            "type": region.type,
            "original_width": task.image_width,
            "original_height": task.image_height,
            "image_rotation": 0,
            "value": {**region.value, region.type: [region.label]},
            "score": round(region.score, 4),
        }
        for i, region in enumerate(task.regions)
    ]
    return {
        "model_version": model_version,
        "score": round(task.score, 4),
        "result": items,
    }
