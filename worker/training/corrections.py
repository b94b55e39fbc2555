"""Human corrections, read from Label Studio (the source of truth) before every training run.

Webhooks can be missed and annotations deleted, so training never trusts what it heard: it
pulls the project's current annotations through label-studio-sdk, takes the latest submitted
(not cancelled) annotation of each task, and turns its results into tags and masks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.jobs import BrushControl, ChoicesControl, TaskId
from backend.projects import project_id
from backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Correction:
    """One task as an annotator left it. ``mask`` (uint8, image size) holds 0 where no label
    applies and k for ``mask_labels[k - 1]``; it is None until known (a project with BrushLabels
    whose annotation has no region gets an all-zero mask once the image size is known)."""

    task_id: TaskId
    image_url: str | None
    tags: dict[str, set[str]] = field(default_factory=dict)  # Choices from_name -> labels
    mask: np.ndarray | None = None
    mask_labels: tuple[str, ...] = ()
    image: Image.Image | None = None  # filled in when the image is fetched

    @property
    def all_tags(self) -> set[str]:
        return set().union(*self.tags.values()) if self.tags else set()


def from_annotation(
    task_id: TaskId,
    image_url: str | None,
    result: Sequence[dict],
    choices: Sequence[ChoicesControl],
    brushes: Sequence[BrushControl],
) -> Correction:
    """Read one annotation's ``result`` list: Choices into tags, BrushLabels RLE into one label
    map (later regions win where regions overlap, as they are drawn on top in the editor)."""
    choice_names = {c.from_name for c in choices}
    brush_names = {b.from_name for b in brushes}
    labels = tuple(dict.fromkeys(label.name for b in brushes for label in b.labels))
    correction = Correction(task_id, image_url, tags={name: set() for name in choice_names}, mask_labels=labels)
    for item in result:
        name, value = item.get("from_name"), item.get("value") or {}
        if item.get("type") == "choices" and name in choice_names:
            correction.tags[name].update(value.get("choices", []))
        elif item.get("type") == "brushlabels" and name in brush_names and value.get("rle"):
            width, height = int(item["original_width"]), int(item["original_height"])
            if correction.mask is None:
                correction.mask = np.zeros((height, width), dtype=np.uint8)
            if correction.mask.shape != (height, width):
                log.warning("task %s: brush regions of different sizes; skipping one", task_id)
                continue
            region = decode_rle(value["rle"]).reshape(height, width, 4)[:, :, 3] > 127
            for label in value.get("brushlabels", []):
                if label in labels:
                    correction.mask[region] = labels.index(label) + 1
    return correction


def latest_annotation(annotations: Iterable[dict]) -> dict | None:
    """The most recently updated annotation that was submitted, not skipped."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    return max(kept, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""), default=None)


def pull_corrections(
    settings: Settings,
    project: str,
    image_key: str,
    choices: Sequence[ChoicesControl],
    brushes: Sequence[BrushControl],
) -> list[Correction]:
    """Every annotated task of ``project``, from Label Studio's API, latest annotation each."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise RuntimeError("Training reads annotations from Label Studio: set LABEL_STUDIO_URL and its API key")
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)
    corrections = []
    for task in client.tasks.list(project=project_id(project), fields="all", only_annotated=True):
        task = task if isinstance(task, dict) else task.model_dump()
        annotation = latest_annotation(task.get("annotations") or [])
        if annotation is None:
            continue
        url = (task.get("data") or {}).get(image_key)
        corrections.append(from_annotation(task["id"], url, annotation.get("result") or [], choices, brushes))
    log.info("project %s: %d corrected tasks in Label Studio", project, len(corrections))
    return corrections
