"""Decode untrusted image bytes into an upright 8-bit RGB picture, or fail with a clear reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from backend.errors import ImageDecodeError

#: The formats a task image may be in. Pillow tries no others: EPS would run Ghostscript, and every
#: decoder left out is attack surface left out. (Phones' multi-picture JPEGs open as JPEG.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers the plugins, so ``formats=`` finds WEBP and TIFF
#: Pixels converted at a time from 16-bit and float images, so no full-size float copy is made.
_CHUNK_PIXELS = 1 << 20
#: What a web server sends instead of an image when a login or error page gets in the way.
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"{")
#: EXIF orientations that turn the picture by 90 degrees (width and height swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data``; apply EXIF orientation; convert any mode to RGB.

    The pixel count is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing. Transparent images are composited on white, as Label Studio shows them
    on a light canvas.

    Raises:
        ImageDecodeError: empty, not an image, truncated, corrupt, or over ``max_pixels``.
    """
    return _decode(data, max_pixels, None)[0]


def decode_for_model(data: bytes, max_pixels: int, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image`` for a model that needs a short side of ``min_side`` at most: a JPEG is
    decoded directly at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at least
    ``min_side`` (a 12-megapixel photo decodes about 5x faster, and resizes 5x faster after).
    Returns the picture and the upright size of the full image, at which masks are drawn."""
    return _decode(data, max_pixels, min_side)


def _decode(data: bytes, max_pixels: int, min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
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
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"The image is too large: {width}x{height} = {width * height:,} pixels, over "
                    f"MAX_IMAGE_PIXELS={max_pixels:,}."
                )
            if min_side is not None:
                image.draft(None, (min_side, min_side))  # JPEG only; other formats decode in full
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"The image is too large to decode safely (a decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"Not a recognised image format ({len(data):,} bytes); prelabel reads {', '.join(FORMATS)}."
        ) from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageDecodeError(f"The image is corrupt or truncated: {e}") from e

    upright = (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
    return to_rgb(ImageOps.exif_transpose(image)), upright


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, keeping the full range of 16-bit and float images. Those are
    brought to 8 bits a band of rows at a time: a 60-megapixel float image never gets a float64 twin."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_8_bits(image)).convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _to_8_bits(image: Image.Image) -> np.ndarray:
    """16-bit values // 257; 32-bit integers the same when any is over 255; floats stretched from
    their minimum to their maximum."""
    array = np.asarray(image)
    low, high = image.getextrema()
    divide = image.mode.startswith("I;16") or (image.mode == "I" and high > 255)
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, array.shape[1]))
    for top in range(0, array.shape[0], rows):
        band = array[top : top + rows]
        if image.mode == "F":
            band = (band - np.float32(low)) * np.float32(255 / (high - low) if high > low else 0)
        elif divide:
            band = band // 257
        out[top : top + rows] = np.clip(band, 0, 255)
    return out
