"""A toy world with exact answers: coloured shapes on textured backgrounds.

No pretrained CLIP can be downloaded where prelabel is built, so quality is measured on scenes
whose every tag and pixel is known. Each scene has 1-4 objects (one large, the rest small, so the
global embedding is dominated by one object as in real photos), each a shape in a colour, on
grass, sky, sand or water. Everything is deterministic from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (45, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS = ("grass", "sky", "sand", "water")
#: Objects whose visible part is smaller than this (pixels) do not count as present.
MIN_VISIBLE = 12


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str


@dataclass(frozen=True)
class Scene:
    """An image, its per-pixel object map (0 = background, k = objects[k-1]) and its objects."""

    image: Image.Image
    object_map: np.ndarray  # uint8 [H, W]
    objects: tuple[ToyObject, ...]  # visible objects only, in drawing order
    background: str

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def colours(self) -> set[str]:
        return {o.colour for o in self.objects}

    def class_map(self, kind: str) -> np.ndarray:
        """Per-pixel class index: 0 = background, 1 + index into SHAPES or COLOURS."""
        names = SHAPES if kind == "shape" else tuple(COLOURS)
        lookup = np.zeros(256, dtype=np.uint8)
        for k, obj in enumerate(self.objects, start=1):
            lookup[k] = 1 + names.index(obj.shape if kind == "shape" else obj.colour)
        return lookup[self.object_map]


def _texture(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy background that is not a flat colour, so models must look at shapes."""
    y, x = np.mgrid[0:size, 0:size] / size
    noise = rng.normal(0, 1, (size, size))
    if kind == "grass":
        base = np.array([70, 140, 50]) + 35 * noise[..., None] * np.array([0.4, 1.0, 0.3])
        base += 20 * np.sin(x * rng.uniform(30, 60))[..., None] * np.array([0.2, 0.6, 0.1])
    elif kind == "sky":
        base = np.array([120, 175, 235]) + 40 * y[..., None] * np.array([0.8, 0.5, 0.1])
        clouds = np.maximum(0, np.sin(x * rng.uniform(4, 9) + rng.uniform(0, 6)) * np.cos(y * 5)) * 80
        base = base + clouds[..., None] + 6 * noise[..., None]
    elif kind == "sand":
        base = np.array([215, 190, 140]) + 18 * noise[..., None] + 10 * np.sin(y * 40 + x * 12)[..., None]
    else:  # water
        waves = np.sin(y * rng.uniform(35, 55) + 3 * np.sin(x * 7)) * 25
        base = np.array([35, 95, 165]) + waves[..., None] * np.array([0.3, 0.6, 1.0]) + 8 * noise[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _polygon(sides: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
            for i in range(sides)]  # fmt: skip


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """Draw the outline-filled shape of radius ``r`` into a mask layer."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape in ("circle", "ring", "crescent"):  # ring and crescent get their hole in _cut
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(4, cx, cy, r * 1.15, angle + math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(3, cx, cy + r * 0.15, r * 1.15, angle - math.pi / 2), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(6, cx, cy, r, angle), fill=fill)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r * (1.0 if i % 2 == 0 else 0.45)
            a = angle - math.pi / 2 + math.pi * i / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")


def _cut(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """Cut the hole of a ring or crescent out of the mask layer (``fill`` = 0)."""
    if shape == "ring":
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=fill)
    elif shape == "crescent":
        dx, dy = r * 0.55 * math.cos(angle), r * 0.55 * math.sin(angle)
        draw.ellipse((cx + dx - r * 0.85, cy + dy - r * 0.85, cx + dx + r * 0.85, cy + dy + r * 0.85), fill=fill)


def render_scene(
    rng: np.random.Generator, size: int = 96, max_objects: int = 4, empty_rate: float = 0.0,
    palette: Sequence[str] | None = None,
) -> Scene:  # fmt: skip
    """One random scene of ``size`` x ``size`` pixels; with probability ``empty_rate`` it shows
    only its background (real projects have many images with none of their labels). ``palette``:
    the colours its objects may have (default: all)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _texture(background, size, rng)
    canvas = np.asarray(image).copy()
    object_map = np.zeros((size, size), dtype=np.uint8)
    empty = empty_rate > 0 and rng.random() < empty_rate  # no draw at 0: older seeds keep their scenes
    count = 0 if empty else int(rng.integers(1, max_objects + 1))
    drawn: list[ToyObject] = []
    colours = tuple(COLOURS) if palette is None else tuple(palette)
    for k in range(count):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        r = size * (rng.uniform(0.24, 0.32) if k == 0 else rng.uniform(0.09, 0.15))
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        angle = rng.uniform(-0.25, 0.25)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255).astype(np.uint8)

        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        _draw(draw, shape, cx, cy, r, angle, 255)
        _cut(draw, shape, cx, cy, r, angle, 0)
        inside = np.asarray(layer) > 127
        canvas[inside] = rgb
        object_map[inside] = k + 1
        drawn.append(ToyObject(shape, colour))

    # keep only objects that remain visible, renumbered in drawing order
    visible = [k for k in range(1, count + 1) if (object_map == k).sum() >= MIN_VISIBLE]
    lookup = np.zeros(256, dtype=np.uint8)
    for new, old in enumerate(visible, start=1):
        lookup[old] = new
    image = Image.fromarray(canvas)
    return Scene(image, lookup[object_map], tuple(drawn[k - 1] for k in visible), background)


def scenes(seed: int, count: int, size: int = 96, max_objects: int = 4, empty_rate: float = 0.0) -> list[Scene]:
    """``count`` scenes, the same for the same arguments on every machine."""
    rng = np.random.default_rng(seed)
    return [render_scene(rng, size, max_objects, empty_rate) for _ in range(count)]


#: A cropped object counts as shown when at least this share of it is inside the crop.
CROP_VISIBLE = 0.4


def crop(scene: Scene, left: int, top: int, side: int, height: int | None = None) -> Scene:
    """The ``side`` x ``side`` view of ``scene`` at (``left``, ``top``), a close-up when small, or
    ``side`` wide and ``height`` high. Objects mostly outside it are not among its objects (their
    pixels become unknown: 255)."""
    height = side if height is None else height
    box = (slice(top, top + height), slice(left, left + side))
    inside = np.bincount(scene.object_map[box].ravel(), minlength=len(scene.objects) + 1)
    total = np.bincount(scene.object_map.ravel(), minlength=len(scene.objects) + 1)
    keep = [k for k in range(1, len(scene.objects) + 1) if inside[k] >= CROP_VISIBLE * total[k]]
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[0] = 0
    for new, old in enumerate(keep, start=1):
        lookup[old] = new
    image = scene.image.crop((left, top, left + side, top + height))
    return Scene(image, lookup[scene.object_map[box]], tuple(scene.objects[k - 1] for k in keep), scene.background)
