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
    """A plain float (numpy's float32 would not survive the job's JSON), clamped to [0, 100]."""
    return round(min(100.0, max(0.0, 100.0 * float(value) / side)), DIGITS)


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
#: Bounds on what one annotation may hold (annotators draw tens of regions of tens of points): the
#: webhook refuses more, so comparing and training stay cheap.
MAX_POINTS = 10_000
MAX_REGIONS = 1_000
MAX_TOTAL_POINTS = 100_000
MAX_LABELS_PER_REGION = 100
#: Coordinates are percent of the image; anything far outside is not a region.
MAX_PERCENT = 10_000.0
REGION_LABELS = ("rectanglelabels", "polygonlabels")


def region_labels(item: Mapping[str, Any]) -> list[str]:
    """The labels of a region result (``value[<type>]``), checked: a list of strings.

    Raises:
        AnnotationError: not a list of at most ``MAX_LABELS_PER_REGION`` strings.
    """
    value = item.get("value")
    labels = value.get(item.get("type")) if isinstance(value, Mapping) else None
    if labels is None:
        return []
    if not (
        isinstance(labels, list) and len(labels) <= MAX_LABELS_PER_REGION and all(isinstance(x, str) for x in labels)
    ):
        raise AnnotationError(f"A region's labels must be a list of at most {MAX_LABELS_PER_REGION} strings.")
    return labels


def region_outline(item: Mapping[str, Any]) -> list[tuple[float, float]]:
    """The corners of a ``rectanglelabels`` result (rotation applied) or the points of a
    ``polygonlabels`` one, in percent of the image.

    Raises:
        AnnotationError: the value is not a box or polygon of bounded numbers.
    """
    value = item.get("value")
    if not isinstance(value, Mapping):
        raise AnnotationError("A box or polygon needs a 'value' object.")
    if item.get("type") == "polygonlabels":
        points = value.get("points")
        if not isinstance(points, list) or not 3 <= len(points) <= MAX_POINTS:
            raise AnnotationError(f"A polygon needs 3 to {MAX_POINTS:,} points.")
        if not all(isinstance(p, list | tuple) and len(p) == 2 and all(_coordinate(c) for c in p) for p in points):
            raise AnnotationError(f"A polygon's points must be pairs of numbers within +-{MAX_PERCENT:g} %.")
        return [(float(x), float(y)) for x, y in points]
    box = [value.get(k) for k in ("x", "y", "width", "height")]
    rotation = value.get("rotation") or 0
    if not all(_coordinate(v) for v in (*box, rotation)):
        raise AnnotationError(f"A box needs numbers x, y, width, height (and rotation) within +-{MAX_PERCENT:g}.")
    x, y, w, h = (float(v) for v in box)
    corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if not rotation:
        return corners
    # Label Studio turns a box clockwise about its top-left corner, in pixels: the aspect matters.
    width, height = item.get("original_width"), item.get("original_height")
    if not all(type(v) is int and 0 < v <= 10**7 for v in (width, height)):
        raise AnnotationError("A rotated box needs its image's original_width and original_height.")
    aspect = width / height
    angle = math.radians(float(rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    turned = []
    for cx, cy in corners:
        dx, dy = (cx - x) * aspect, cy - y  # in units of the image's height
        turned.append((x + (dx * cos - dy * sin) / aspect, y + dx * sin + dy * cos))
    return turned


def box_extent(item: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """A box's (or polygon's) extent, rotation applied, as fractions (x0, y0, x1, y1) of the
    image, clipped to it."""
    xs, ys = zip(*region_outline(item), strict=True)
    x0, y0, x1, y1 = (min(max(v / 100, 0.0), 1.0) for v in (min(xs), min(ys), max(xs), max(ys)))
    return x0, y0, x1, y1


def outline_mask(item: Mapping[str, Any]) -> np.ndarray:
    """A box or polygon result drawn on the ``GRID`` x ``GRID`` percent grid (booleans)."""
    return draw_outline(region_outline(item), (GRID, GRID))


def draw_outline(points: Sequence[tuple[float, float]], size: tuple[int, int]) -> np.ndarray:
    """An outline in percent drawn at ``size`` (width, height): a [height, width] boolean mask of
    the pixels whose centres it holds (a box from 0 to 20 pixels covers pixels 0..19)."""
    width, height = size
    image = Image.new("1", size)
    # Pillow fills a pixel when the outline reaches its centre: shift edges to centres.
    ImageDraw.Draw(image).polygon([(x * width / 100 - 0.5, y * height / 100 - 0.5) for x, y in points], fill=1)
    return np.asarray(image)


def _coordinate(value: Any) -> bool:
    """A real number (not a bool) of at most ``MAX_PERCENT`` in size."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return abs(float(value)) <= MAX_PERCENT
    except OverflowError:  # an int too large for a float
        return False
