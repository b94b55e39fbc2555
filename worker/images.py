"""Decode untrusted image bytes into an upright 8-bit RGB picture, or fail with a clear reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageDecodeError

#: What a web server sends instead of an image when a login or error page gets in the way.
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"{")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data``; apply EXIF orientation; convert any mode to RGB.

    The pixel count is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing. Transparent images are composited on white, as Label Studio shows them
    on a light canvas.

    Raises:
        ImageDecodeError: empty, not an image, truncated, corrupt, or over ``max_pixels``.
    """
    if not data:
        raise ImageDecodeError("The image is empty (0 bytes).")
    head = data[:512].lstrip().lower()
    if b"<svg" in head:
        raise ImageDecodeError("SVG images are not supported: export the image as PNG or JPEG.")
    if head.startswith(_HTML_PREFIXES):
        raise ImageDecodeError(
            "The server returned a web page or JSON, not an image (often a login page: check "
            "LABEL_STUDIO_API_KEY and the image URL)."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"The image is too large: {width}x{height} = {width * height:,} pixels, over "
                    f"MAX_IMAGE_PIXELS={max_pixels:,}."
                )
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"The image is too large to decode safely (a decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"Not a recognised image format ({len(data):,} bytes).") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageDecodeError(f"The image is corrupt or truncated: {e}") from e

    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, keeping the full range of 16-bit and float images."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = array / 257.0 if mode.startswith("I;16") or array.max() > 255 else array
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
