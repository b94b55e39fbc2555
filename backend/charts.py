"""Charts for the dashboard, drawn here as SVG: no JavaScript library, no CDN, nothing to fetch.

Each function takes plain numbers and returns one ``<svg>`` element as a string; every text in
it is escaped. Points carry a ``<title>`` (the browser's tooltip) with their exact value and the
number of corrections behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 40
#: Colours of successive series (colour-blind safe, from Okabe and Ito).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # the tooltip: what the point is, its value, how many corrections


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    if high == low:
        return (start + end) / 2
    return start + (value - low) / (high - low) * (end - start)


def _frame(
    y_max: float, y_format: str, x_ticks: Sequence[tuple[float, str]], x_range: tuple[float, float]
) -> list[str]:
    """Axes, horizontal grid lines at quarters of ``y_max``, and the x tick labels."""
    parts = []
    for i in range(5):
        value = y_max * i / 4
        y = _scale(value, 0, y_max, HEIGHT - BOTTOM, TOP)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(format(value, y_format))}</text>')
    for x_value, text in x_ticks:
        x = _scale(x_value, *x_range, LEFT, WIDTH - RIGHT)
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{escape(text)}</text>')
    return parts


def line_chart(series: Sequence[Series], title: str, y_max: float = 1.0, y_format: str = ".0%",
               x_ticks: Sequence[tuple[float, str]] = ()) -> str:  # fmt: skip
    """Lines with dots, one per series; an empty chart says there is no data yet."""
    xs = [p.x for s in series for p in s.points]
    if not xs:
        return _empty(title)
    x_range = (min(xs), max(xs))
    y_max = max([y_max, *(p.y for s in series for p in s.points)])
    parts = _frame(y_max, y_format, x_ticks, x_range)
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        coords = [(_scale(p.x, *x_range, LEFT, WIDTH - RIGHT), _scale(p.y, 0, y_max, HEIGHT - BOTTOM, TOP))
                  for p in s.points]  # fmt: skip
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for (x, y), p in zip(coords, s.points, strict=True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{escape(p.label)}</title>'
                         "</circle>")  # fmt: skip
    return _svg(title, parts, [s.name for s in series])


def bar_chart(bars: Sequence[Point], title: str, y_max: float = 1.0, y_format: str = ".0%") -> str:
    """One bar per point, its label under it (``x`` is ignored: bars keep their order)."""
    if not bars:
        return _empty(title)
    y_max = max([y_max, *(b.y for b in bars)])
    parts = _frame(y_max, y_format, (), (0, 1))
    slot = (WIDTH - LEFT - RIGHT) / len(bars)
    for n, bar in enumerate(bars):
        height = _scale(bar.y, 0, y_max, 0, HEIGHT - BOTTOM - TOP)
        x = LEFT + n * slot + slot * 0.15
        parts.append(
            f'<rect x="{x:.1f}" y="{HEIGHT - BOTTOM - height:.1f}" width="{slot * 0.7:.1f}" height="{height:.1f}" '
            f'fill="{PALETTE[0]}"><title>{escape(bar.label)}</title></rect>'
        )
        name = bar.label.split(":")[0]
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
                     f"{escape(name[:18])}</text>")  # fmt: skip
    return _svg(title, parts, [])


def _empty(title: str) -> str:
    return _svg(title, [f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">No data yet</text>'], [])


def _svg(title: str, parts: list[str], legend: Sequence[str]) -> str:
    keys = "".join(
        f'<rect x="{LEFT + 150 * n}" y="{HEIGHT - 14}" width="10" height="10" fill="{PALETTE[n % len(PALETTE)]}"/>'
        f'<text x="{LEFT + 150 * n + 14}" y="{HEIGHT - 5}">{escape(name[:22])}</text>'
        for n, name in enumerate(legend)
    )
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>{"".join(parts)}{keys}</svg>'
    )
