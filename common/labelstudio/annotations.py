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


def regions(result: Iterable[dict], kinds: Iterable[str]) -> Iterator[dict]:
    """The regions of a result list whose type is one of ``kinds`` (``brushlabels``,
    ``rectanglelabels``, ``polygonlabels``), in drawing order; brush regions only with an RLE."""
    wanted = set(kinds)
    for item in result:
        kind = item.get("type")
        if kind in wanted and (kind != "brushlabels" or (item.get("value") or {}).get("rle")):
            yield item
