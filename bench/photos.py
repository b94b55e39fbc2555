"""The benchmarks' inputs: the shared real photographs (../shared/data, or
``PRELABEL_SHARED_DATA``) and their JPEG bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRELABEL_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()


def photos(count: int) -> list[Image.Image]:
    """``count`` RGB photos, VOC then ImageNet samples, repeated when there are fewer."""
    paths = sorted((DATA / "voc-samples").glob("*.jpg")) + sorted((DATA / "imagenet-samples").glob("*.JPEG"))
    return [Image.open(p).convert("RGB") for p in (paths * count)[:count]]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
