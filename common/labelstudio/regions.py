"""Boxes and polygons in Label Studio's coordinates (PROTOCOL.md section 4): percent of the
image's width and height, so the same numbers hold at any resolution the masks were made at.
Predictions are written with ``rectangle_value``/``polygon_value``; annotations are read back as
outlines and masks (``region_outline``, ``outline_mask``) for the report and for training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.errors import AnnotationError

#: Digits kept in percent coordinates: 1e-4 % of a 100,000-pixel side is a tenth of a pixel.
DIGITS = 4


def _percent(value: float, side: int) -> float:
    return round(min(100.0, max(0.0, 100.0 * value / side)), DIGITS)


def rectangle_value(box: tuple[int, int, int, int], size: tuple[int, int]) -> dict[str, Any]:
    """``box`` = (x0, y0, x1, y1) in pixels of an image of ``size`` (width, height), x1 and y1
    exclusive -> a RectangleLabels value without its labels."""
    x0, y0, x1, y1 = box
    width, height = size
    x, y = _percent(x0, width), _percent(y0, height)
    return {
        "x": x,
        "y": y,
        "width": round(_percent(x1, width) - x, DIGITS),
        "height": round(_percent(y1, height) - y, DIGITS),
        "rotation": 0,
    }


def polygon_value(points: Sequence[tuple[float, float]], size: tuple[int, int]) -> dict[str, Any]:
    """``points`` (x, y) in pixels of an image of ``size`` -> a PolygonLabels value without its labels."""
    width, height = size
    return {"points": [[_percent(x, width), _percent(y, height)] for x, y in points], "closed": True}


#: Boxes and polygons are compared on a grid of this many cells a side, in percent space: IoU does
#: not change when the two axes are scaled, so the image's size is not needed (only to rotate).
GRID = 1000
#: A polygon of more points than this is refused (annotators draw tens; the webhook bounds work).
MAX_POINTS = 10_000
REGION_LABELS = ("rectanglelabels", "polygonlabels")


def region_outline(item: Mapping[str, Any]) -> list[tuple[float, float]]:
    """The corners of a ``rectanglelabels`` result (rotation applied) or the points of a
    ``polygonlabels`` one, in percent of the image.

    Raises:
        AnnotationError: the value is not a box or polygon of finite numbers.
    """
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise AnnotationError("A box or polygon needs a 'value' object.")
    if item.get("type") == "polygonlabels":
        points = value.get("points")
        if not isinstance(points, list) or not 3 <= len(points) <= MAX_POINTS:
            raise AnnotationError(f"A polygon needs 3 to {MAX_POINTS:,} points.")
        if not all(isinstance(p, list | tuple) and len(p) == 2 and all(_finite(c) for c in p) for p in points):
            raise AnnotationError("A polygon's points must be pairs of numbers.")
        return [(float(x), float(y)) for x, y in points]
    box = [value.get(k) for k in ("x", "y", "width", "height")]
    rotation = value.get("rotation") or 0
    if not all(_finite(v) for v in (*box, rotation)):
        raise AnnotationError("A box needs numbers x, y, width, height (and rotation).")
    x, y, w, h = (float(v) for v in box)
    corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if not rotation:
        return corners
    # Label Studio turns a box clockwise about its top-left corner, in pixels: the aspect matters.
    width, height = item.get("original_width"), item.get("original_height")
    aspect = width / height if _finite(width) and _finite(height) and width > 0 and height > 0 else 1.0
    angle = math.radians(float(rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    turned = []
    for cx, cy in corners:
        dx, dy = (cx - x) * aspect, cy - y  # in units of the image's height
        turned.append((x + (dx * cos - dy * sin) / aspect, y + dx * sin + dy * cos))
    return turned


def outline_mask(item: Mapping[str, Any]) -> np.ndarray:
    """A box or polygon result drawn on the ``GRID`` x ``GRID`` percent grid (booleans)."""
    return draw_outline(region_outline(item), (GRID, GRID))


def draw_outline(points: Sequence[tuple[float, float]], size: tuple[int, int]) -> np.ndarray:
    """An outline in percent drawn at ``size`` (width, height): a [height, width] boolean mask."""
    width, height = size
    image = Image.new("1", size)
    ImageDraw.Draw(image).polygon([(x * width / 100, y * height / 100) for x, y in points], fill=1)
    return np.asarray(image)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
