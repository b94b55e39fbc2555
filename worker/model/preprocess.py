"""Resize and normalise images for the ViT at a working resolution, keeping their aspect ratio."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: Very long panoramas are shrunk until the long side is at most this many short sides.
MAX_ASPECT = 2.0


def working_size(width: int, height: int, short_side: int, patch: int) -> tuple[int, int]:
    """(W, H) with the short side near ``short_side``, or the image's own when that is smaller
    (TagCLIP runs at native resolution: upsampling adds tokens, not information); both multiples
    of ``patch`` (rounded up as TagCLIP does), the long side capped at ``MAX_ASPECT`` short sides."""
    short_side = min(short_side, width, height)
    scale = short_side / min(width, height)
    scale = min(scale, short_side * MAX_ASPECT / max(width, height))
    return (
        max(patch, math.ceil(width * scale / patch) * patch),
        max(patch, math.ceil(height * scale / patch) * patch),
    )


def to_pixels(image: Image.Image, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """RGB image -> normalised float tensor [3, H, W] at ``size`` = (W, H), bicubic as CLIP was trained."""
    resized = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
