"""Boxes and polygons from a label's mask: one per connected part (an instance, as far as a
semantic mask can tell), for ``<RectangleLabels>`` and ``<PolygonLabels>``.

Masks come at the working resolution of the probability maps (``worker/model/dense.py``); the
coordinates are returned in percent (``common/labelstudio/regions.py``), which need no scaling.
"""

from __future__ import annotations

import cv2
import numpy as np

from common.labelstudio.regions import polygon_value, rectangle_value

#: Boxes or polygons per label and image at most, the largest parts: past a few tens, parts of a
#: semantic mask are specks, not objects, and a prediction of thousands burdens the editor.
MAX_PARTS = 20
#: Polygon simplification: points may move this share of the part's perimeter (Douglas-Peucker);
#: at least one pixel of the mask's resolution.
POLYGON_TOLERANCE = 0.01


def parts(mask: np.ndarray, min_area: float) -> list[np.ndarray]:
    """The connected parts of a boolean mask covering at least ``min_area`` of it (a fraction),
    largest first, at most ``MAX_PARTS``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    smallest = max(1.0, min_area * mask.size)
    kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= smallest]
    kept.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in kept[:MAX_PARTS]]


def box(part: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a part, x1 and y1 exclusive."""
    ys, xs = np.nonzero(part)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def outline(part: np.ndarray) -> list[tuple[float, float]]:
    """The part's outer boundary, simplified, as (x, y) points in pixels, a quarter pixel inside its
    edges (a part one pixel wide still has an area)."""
    # Trace a 2x upsampled copy: its boundary pixels' centres are a quarter pixel inside the edges.
    big = cv2.resize(part.view(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(np.pad(big, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    tolerance = max(2.0, POLYGON_TOLERANCE * cv2.arcLength(contour, True))
    simplified = cv2.approxPolyDP(contour, tolerance, True)[:, 0, :].astype(float)
    if len(simplified) < 3:  # a thin part simplified to a segment: its tightest rectangle instead
        simplified = cv2.boxPoints(cv2.minAreaRect(contour))
    # Undo the padding, take the pixel centres, halve.
    return [((x - 1 + 0.5) / 2, (y - 1 + 0.5) / 2) for x, y in simplified]


def rectangles(mask: np.ndarray, min_area: float) -> list[dict]:
    """RectangleLabels values (no labels) for the parts of ``mask``."""
    size = (mask.shape[1], mask.shape[0])
    return [rectangle_value(box(p), size) for p in parts(mask, min_area)]


def polygons(mask: np.ndarray, min_area: float) -> list[dict]:
    """PolygonLabels values (no labels) for the parts of ``mask``."""
    size = (mask.shape[1], mask.shape[0])
    return [polygon_value(outline(p), size) for p in parts(mask, min_area)]
