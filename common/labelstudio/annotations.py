"""Reading Label Studio tasks and annotations (PROTOCOL.md sections 4-5): the task's image URL,
the annotation that counts, and what an annotation's ``result`` list says."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from common.errors import AnnotationError
from common.labelstudio.brush import region_size
from common.labelstudio.regions import MAX_REGIONS, MAX_TOTAL_POINTS, REGION_LABELS, region_labels, region_outline


def is_task(task: Any) -> bool:
    """Whether ``task`` is a task object with Label Studio's kind of id: a non-negative integer
    (it names cache keys and the predictions posted back)."""
    return isinstance(task, dict) and type(task.get("id")) is int and 0 <= task["id"] < 2**63


def image_url(task: dict[str, Any], key: str) -> str | None:
    """The task's image value under ``key`` (the ``<Image value="$key">`` of the config), or None."""
    data = task.get("data")
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def latest_annotation(annotations: Iterable[dict]) -> dict | None:
    """The most recently updated annotation that was submitted, not skipped."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    return max(kept, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""), default=None)


def chosen(result: Iterable[dict]) -> dict[str, set[str]]:
    """The labels chosen in each ``<Choices>`` control (by ``from_name``) of a result list."""
    out: dict[str, set[str]] = defaultdict(set)
    for item in result:
        value = item.get("value") if item.get("type") == "choices" else None
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list):
            out[str(item.get("from_name", ""))].update(c for c in choices if isinstance(c, str))
    return out


def regions(result: Iterable[dict], kinds: Iterable[str]) -> Iterator[dict]:
    """The regions of a result list whose type is one of ``kinds`` (``brushlabels``,
    ``rectanglelabels``, ``polygonlabels``), in drawing order; brush regions only with an RLE."""
    wanted = set(kinds)
    for item in result:
        kind = item.get("type")
        value = item.get("value")
        if kind in wanted and (kind != "brushlabels" or (isinstance(value, dict) and value.get("rle"))):
            yield item


def check_annotation(annotation: dict, max_pixels: int) -> None:
    """What the webhook checks before accepting an annotation, and training before reading one
    (Label Studio checks only that ``result`` is a list): its shape, how many regions and polygon
    points it holds, every brush region's sizes and RLE header (nothing is decoded), every box's
    and polygon's numbers, and the labels of every region and choice.

    Raises:
        AnnotationError: with the reason.
    """
    if not isinstance(annotation.get("id"), int | str):
        raise AnnotationError("An annotation needs an 'id'.")
    result = annotation.get("result") or []
    if not isinstance(result, list) or not all(isinstance(item, dict) for item in result):
        raise AnnotationError(f"Annotation {annotation['id']}: 'result' must be a list of objects.")
    drawn = [item for item in result if item.get("type") in ("brushlabels", *REGION_LABELS)]
    if len(drawn) > MAX_REGIONS:
        raise AnnotationError(f"Annotation {annotation['id']}: more than {MAX_REGIONS:,} regions.")
    points = 0
    for item in result:
        kind = item.get("type")
        if kind not in ("choices", "brushlabels", *REGION_LABELS):
            continue
        try:
            region_labels(item)  # value[type]: the region's labels, or the choices made
            if kind == "brushlabels":
                region_size(item, max_pixels)
            elif kind in REGION_LABELS:
                points += len(region_outline(item))
        except AnnotationError as e:
            raise AnnotationError(f"Annotation {annotation['id']}: {e}") from e
    if points > MAX_TOTAL_POINTS:
        raise AnnotationError(f"Annotation {annotation['id']}: more than {MAX_TOTAL_POINTS:,} polygon points.")
