"""Decode untrusted image bytes into an upright 8-bit RGB picture, or fail with a clear reason."""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from common.errors import ImageDecodeError
from common.labelstudio.brush import MAX_ASPECT_RATIO

#: The formats a task image may be in. Pillow tries no others: EPS would run Ghostscript, and every
#: decoder left out is attack surface left out. (Phones' multi-picture JPEGs open as JPEG.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers the plugins, so ``formats=`` finds WEBP and TIFF
#: Scans a JPEG may have: a progressive JPEG has about ten, and each scan costs a pass over every
#: pixel, so a 200 kB file of a thousand tiny scans decodes for a minute.
MAX_JPEG_SCANS = 64
_START_OF_SCAN = b"\xff\xda"  # a JPEG marker; entropy-coded data stuffs every 0xFF with 0x00
#: Seconds a decode waits for room in the pixel budget before its task fails.
BUDGET_WAIT = 120.0
#: Pixels converted at a time from 16-bit and float images, so no full-size float copy is made.
_CHUNK_PIXELS = 1 << 20
#: What a web server sends instead of an image when a login or error page gets in the way.
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"{")
#: How each EXIF orientation is undone (ImageOps.exif_transpose's table).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
#: EXIF orientations that turn the picture by 90 degrees (width and height swap).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class PixelBudget:
    """At most ``pixels`` pixels being decoded at once, across threads. Each fetch thread may hold
    an image of MAX_IMAGE_PIXELS, and a handful decoded together (4 bytes a pixel, plus copies
    for colour conversion) would take gigabytes; past the budget, a thread waits its turn."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self._free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, timeout: float = BUDGET_WAIT) -> Iterator[None]:
        pixels = min(pixels, self.pixels)  # one image larger than the budget still gets it all
        with self._changed:
            if not self._changed.wait_for(lambda: self._free >= pixels, timeout=timeout):
                raise ImageDecodeError(
                    f"The worker spent {timeout:.0f} s waiting for other large images to decode; try again."
                )
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data``; apply EXIF orientation; convert any mode to RGB.

    The pixel count is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing. Transparent images are composited on white, as Label Studio shows them
    on a light canvas.

    Raises:
        ImageDecodeError: empty, not an image, truncated, corrupt, or over ``max_pixels``.
    """
    return _decode(data, max_pixels, None)[0]


def decode_for_model(
    data: bytes, max_pixels: int, min_side: int, budget: PixelBudget | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image`` for a model that needs a short side of ``min_side`` at most: a JPEG is
    decoded directly at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at least
    ``min_side`` (a 12-megapixel photo decodes about 5x faster, and resizes 5x faster after);
    other formats are reduced by a whole factor right after decoding, before any colour
    conversion copies them. Returns the picture and the upright size of the full image, at which
    masks are drawn. ``budget`` bounds the pixels decoded at once across threads."""
    return _decode(data, max_pixels, min_side, budget)


def _decode(
    data: bytes, max_pixels: int, min_side: int | None, budget: PixelBudget | None = None
) -> tuple[Image.Image, tuple[int, int]]:
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
            scans = data.count(_START_OF_SCAN) if image.format in ("JPEG", "MPO") else 0
            if scans > MAX_JPEG_SCANS:
                raise ImageDecodeError(
                    f"The JPEG has {scans:,} scans; prelabel decodes at most {MAX_JPEG_SCANS} (a progressive JPEG "
                    "has about ten): re-save it."
                )
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"The image is too large: {width}x{height} = {width * height:,} pixels, over "
                    f"MAX_IMAGE_PIXELS={max_pixels:,}."
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageDecodeError(
                    f"The image is {width}x{height}: prelabel reads images whose long side is at most "
                    f"{MAX_ASPECT_RATIO} times the short one."
                )
            with budget.hold(width * height) if budget else contextlib.nullcontext():
                if min_side is not None:
                    image.draft(None, (min_side, min_side))  # JPEG only; other formats decode in full
                image.load()
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                if min_side is not None and min(image.size) >= 2 * min_side:
                    with contextlib.suppress(ValueError):  # modes reduce() lacks (P, 1, I;16) convert in full
                        image = image.reduce(min(image.size) // min_side)
                if orientation in _UPRIGHT:
                    image = image.transpose(_UPRIGHT[orientation])
                picture = to_rgb(image)
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
    except Exception as e:  # Pillow's decoders raise many more kinds on hostile bytes (struct, type, index...)
        raise ImageDecodeError(f"The image is corrupt: {type(e).__name__}: {str(e)[:200]}") from e

    upright = (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
    return picture, upright


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
