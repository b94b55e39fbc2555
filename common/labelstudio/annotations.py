"""Reading Label Studio tasks and annotations (PROTOCOL.md sections 4-5): the task's image URL,
the annotation that counts, and what an annotation's ``result`` list says."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any


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
        choices = (item.get("value") or {}).get("choices", []) if item.get("type") == "choices" else []
        out[str(item.get("from_name", ""))].update(c for c in choices if isinstance(c, str))
    return out


def brush_regions(result: Iterable[dict]) -> Iterator[dict]:
    """The brush regions of a result list that carry an RLE, in drawing order."""
    for item in result:
        if item.get("type") == "brushlabels" and (item.get("value") or {}).get("rle"):
            yield item
