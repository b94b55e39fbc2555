"""Label Studio's brush RLE: encoded with numpy, decoded with every size checked first.

``label_studio_sdk.converter.brush.mask2rle`` builds the bit string with a Python loop over the
runs of the RGBA-expanded mask: about 120 ms per mask of a 12-megapixel photo, which would cap a
GPU worker at a few images a second. ``mask_to_rle`` returns the same numbers (tested against the
SDK on every VOC mask and on random masks) with numpy: the runs of the mask itself (each pixel is
four equal RGBA values, so RGBA runs are pixel runs times four), one variable-length code per run,
all codes packed into bytes at once.

The format (the SDK's ``encode_rle``, 8-bit words, run sizes 3, 4, 8 and 16 bits): a header of the
value count (32 bits), word size - 1 (5 bits) and each run size - 1 (4 bits each); then per run
either ``0 00 000 <value>`` for a single value, or ``1 <size index> <length - 1> <value>`` with the
smallest run size that holds the length; runs over 2**16 are written as chunks of 2**16 first;
zeros up to the next byte (a whole zero byte when already aligned).

Masks are computed at a working resolution (at most 1024 px) and shown on the full photo.
``scaled_mask_to_rle`` encodes a mask as drawn at the photo's size by nearest neighbour without
drawing it: each output row repeats the runs of its source row, stretched to output columns, so a
12-megapixel mask costs what its working-size mask does.

Annotations arrive from Label Studio (webhooks, the API) and are untrusted: a 12 kB RLE can
announce a 48 MB image. ``region_size`` checks a ``brushlabels`` result without decoding it (the
sizes are positive integers within ``MAX_IMAGE_PIXELS`` and the RLE's header announces exactly
their 4 x width x height values); ``region_mask`` then decodes it to one boolean per pixel, never
allocating the RGBA image the SDK's ``decode_rle`` builds.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from common.errors import AnnotationError

_CHANNELS = 4  # RGBA: Label Studio paints the mask's value into all four
_WORD_BITS = 8
_RUN_SIZES = (3, 4, 8, 16)
_LONGEST = 2**16
_RUNS_PER_CHUNK = 1 << 16  # bounds the [runs, 32] bit matrix to a few MB
#: Codes (runs and literal groups) a brush RLE may hold. Decoding reads them one at a time (about
#: 2 us each); a person's brush strokes, or a mask upsampled from a patch grid, have far fewer.
MAX_RLE_CODES = 2_000_000
#: The longest side of an image may be this many times the shortest, and so may the size a region
#: says it was drawn at: masks are encoded row by row at the image's size, so a 1 x 60,000,000
#: strip (a 240 kB PNG, a 200-byte polygon) would cost gigabytes.
MAX_ASPECT_RATIO = 50
#: Pixels of literal groups decoded per vectorised pass (bounds its index arrays to a few MB).
_PIXELS_PER_PASS = 1 << 18


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A 2-D mask -> the RLE numbers of a ``brushlabels`` result: boolean (True is painted, as
    255) or uint8 (0 = empty, 255 = painted)."""
    _check(mask)
    flat = mask.ravel()
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    return _encode(_painted(mask, flat[ends]), np.diff(ends, prepend=-1), flat.size)


def scaled_mask_to_rle(mask: np.ndarray, size: tuple[int, int]) -> list[int]:
    """``mask_to_rle(draw_scaled(mask, size))``, computed from the runs of ``mask`` itself."""
    _check(mask)
    width, height = size
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask_to_rle(mask)
    starts = np.ones((h, w), dtype=bool)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    row, col = np.nonzero(starts)  # every run of every source row, in order
    per_row = np.bincount(row, minlength=h)
    end = np.append(col[1:], w)
    end[np.cumsum(per_row) - 1] = w  # a row's last run ends at the row's end
    edge = -(-np.arange(w + 1) * width // w)  # first output column of each source column
    run_lengths, run_values = edge[end] - edge[col], mask[row, col]
    # Output row y repeats the runs of source row source[y].
    source = nearest_index(h, height)
    counts = per_row[source]
    first = (np.cumsum(per_row) - per_row)[source]
    index = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    lengths, values = run_lengths[index], run_values[index]
    keep = lengths > 0  # a source column no output column reads (only when shrinking)
    lengths, values = lengths[keep], values[keep]
    joined = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # a run may go on into the next row
    return _encode(_painted(mask, values[joined]), np.add.reduceat(lengths, joined), width * height)


def nearest_index(source: int, target: int) -> np.ndarray:
    """For each of ``target`` output positions, the source position nearest-neighbour scaling reads."""
    return np.arange(target) * source // target


def draw_scaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` [h, w] drawn at ``size`` = (width, height) by nearest neighbour."""
    width, height = size
    rows, cols = nearest_index(mask.shape[0], height), nearest_index(mask.shape[1], width)
    return mask[rows[:, None], cols[None, :]]


def _check(mask: np.ndarray) -> None:
    if mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"expected a 2-D boolean or uint8 mask, got {mask.ndim}-D {mask.dtype}")
    if mask.size == 0:
        raise ValueError("the mask is empty (no pixels)")


def _painted(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Run values as the 8-bit words Label Studio stores: True is 255."""
    return values.astype(np.int64) * (255 if mask.dtype == np.bool_ else 1)


def _encode(values: np.ndarray, pixel_runs: np.ndarray, pixels: int) -> list[int]:
    """Header and run codes of an image of ``pixels`` pixels, packed into bytes."""
    codes, widths = _run_codes(pixel_runs.astype(np.int64) * _CHANNELS, values)
    header_codes = np.array([pixels * _CHANNELS, _WORD_BITS - 1, *(s - 1 for s in _RUN_SIZES)], dtype=np.int64)
    header_widths = np.array([32, 5, *(4 for _ in _RUN_SIZES)], dtype=np.int64)
    codes, widths = np.concatenate([header_codes, codes]), np.concatenate([header_widths, widths])
    bits = np.concatenate([_bits(codes[i : i + _RUNS_PER_CHUNK], widths[i : i + _RUNS_PER_CHUNK])
                           for i in range(0, codes.size, _RUNS_PER_CHUNK)])  # fmt: skip
    packed = np.packbits(bits)  # pads the last byte with zeros
    if bits.size % 8 == 0:
        packed = np.append(packed, np.uint8(0))  # the SDK always adds at least one zero bit
    return packed.tolist()


def _run_codes(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run's code and bit width, runs over 2**16 preceded by their 2**16-long chunks."""
    flag = np.select(
        [lengths == 1, lengths <= 8, lengths <= 16, lengths <= 256],
        [0b000, 0b100, 0b101, 0b110],
        0b111,
    )
    size = np.select([lengths == 1, lengths <= 8, lengths <= 16, lengths <= 256], [3, 3, 4, 8], 16)
    chunks = np.where(lengths > 256, (lengths - 1) // _LONGEST, 0)
    last = lengths - chunks * _LONGEST
    tail = np.where(lengths == 1, 0, last - 1)
    final = (flag << (size + _WORD_BITS)) | (tail << _WORD_BITS) | values
    width = 3 + size + _WORD_BITS
    if not chunks.any():
        return final, width
    # Interleave: run i's chunks (all the same code), then its final code.
    chunk_code = (0b111 << (16 + _WORD_BITS)) | ((_LONGEST - 1) << _WORD_BITS) | values
    repeats = chunks + 1
    starts = np.cumsum(repeats) - repeats
    codes = np.repeat(chunk_code, repeats)
    widths = np.full(codes.size, 3 + 16 + _WORD_BITS, dtype=np.int64)
    codes[starts + chunks] = final
    widths[starts + chunks] = width
    return codes, widths


def _bits(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The low ``widths[i]`` bits of each ``codes[i]``, most significant first, concatenated."""
    position = np.arange(32, dtype=np.int64)
    shifts = widths[:, None] - 1 - position
    bits = (codes[:, None] >> np.clip(shifts, 0, None)) & 1
    return bits[shifts >= 0].astype(np.uint8)


def original_size(item: Mapping[str, Any], max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of the image a region was drawn on, checked: positive integers within
    ``max_pixels`` and ``MAX_ASPECT_RATIO``, as the images prelabel reads.

    Raises:
        AnnotationError: sizes missing, not positive integers, over ``max_pixels`` or too narrow.
    """
    width, height = item.get("original_width"), item.get("original_height")
    kind = "A brush region" if item.get("type") == "brushlabels" else "A region"
    if not (_positive_int(width) and _positive_int(height)):
        raise AnnotationError(
            f"{kind} needs positive integer original_width and original_height, got {_show(width)} x {_show(height)}."
        )
    if width > max_pixels or height > max_pixels:  # before multiplying or printing numbers of any length
        raise AnnotationError(f"{kind}'s sides are over MAX_IMAGE_PIXELS={max_pixels:,}.")
    if width * height > max_pixels:
        raise AnnotationError(
            f"{kind} of {width}x{height} = {width * height:,} pixels is over MAX_IMAGE_PIXELS={max_pixels:,}."
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise AnnotationError(
            f"{kind} drawn on a {width}x{height} image: prelabel reads images whose long side is at most "
            f"{MAX_ASPECT_RATIO} times the short one."
        )
    return width, height


def region_size(item: Mapping[str, Any], max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of a ``brushlabels`` result, checked without decoding its RLE (one
    vectorised pass over its bytes).

    Raises:
        AnnotationError: sizes missing, not positive integers, over ``max_pixels`` or too narrow;
            an RLE that is not a list of bytes, too short for its header, or whose header announces
            another size.
    """
    width, height = original_size(item, max_pixels)
    rle = (item.get("value") or {}).get("rle") if isinstance(item.get("value"), Mapping) else None
    if not isinstance(rle, list) or len(rle) < 7:
        raise AnnotationError("A brush region's value.rle must be a list of at least 7 bytes (its header).")
    if len(rle) > _longest_rle(width * height * _CHANNELS):
        raise AnnotationError(
            f"A brush region's RLE of {len(rle):,} bytes is longer than a {width}x{height} mask can need."
        )
    announced = int.from_bytes(_bytes(rle)[:4].tobytes(), "big")
    if announced != width * height * _CHANNELS:
        raise AnnotationError(
            f"A brush region's RLE announces {announced:,} values, not the {width * height * _CHANNELS:,} of a "
            f"{width}x{height} image."
        )
    return width, height


def region_mask(item: Mapping[str, Any], max_pixels: int) -> np.ndarray:
    """The painted pixels of a ``brushlabels`` result as a boolean [height, width] array (alpha > 127,
    as the SDK reads it), after ``region_size``'s checks.

    Raises:
        AnnotationError: the checks fail, or the RLE is corrupt (bytes out of range, runs that end
            early or overrun the image).
    """
    width, height = region_size(item, max_pixels)
    return rle_to_mask(item["value"]["rle"], width, height)


def rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Brush RLE numbers -> boolean [height, width] (alpha > 127). Check untrusted sizes with
    ``region_size`` first.

    The codes are read one by one (a variable-length format allows nothing else), at most
    ``MAX_RLE_CODES`` of them; everything per value or per pixel is vectorised. Memory: the mask,
    one byte per bit of the RLE, and 25 bytes per code.

    Raises:
        AnnotationError: bytes out of range, another size in the header, more than
            ``MAX_RLE_CODES`` codes, runs that end early or overrun the image.
    """
    data = _bytes(rle)
    if data.size < 7 or int.from_bytes(data[:4].tobytes(), "big") != width * height * _CHANNELS:
        raise AnnotationError(f"A brush RLE's header does not announce a {width}x{height} image.")
    stream = (np.unpackbits(data) + ord("0")).tobytes()  # one ASCII digit per bit: int(..., 2) reads fields
    reader = _BitReader(stream)
    total = reader.read(32)
    word = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in range(4)]
    if word != _WORD_BITS:
        raise AnnotationError(f"A brush region's RLE uses {word}-bit words; Label Studio's use 8.")
    # Per code: where its values start in the output, how many, and its value (a run) or the bit
    # position of its values (a literal group).
    starts, counts, payloads, literal = array("q"), array("q"), array("q"), array("b")
    done = 0
    while done < total:
        if len(starts) == MAX_RLE_CODES:
            raise AnnotationError(f"A brush region's RLE has more than {MAX_RLE_CODES:,} runs.")
        repeated = reader.read(1)
        count = 1 + reader.read(sizes[reader.read(2)])
        starts.append(done)
        counts.append(count)
        literal.append(not repeated)
        if repeated:
            payloads.append(reader.read(word))
        else:
            payloads.append(reader.position)
            reader.skip(count * word)
        done += count
    if done != total:
        raise AnnotationError(f"A brush region's RLE runs cover {done:,} values, not the {total:,} it announces.")
    return _alpha(stream, starts, counts, payloads, literal).reshape(height, width) > 127


def _alpha(stream: bytes, starts: array, counts: array, payloads: array, literal: array) -> np.ndarray:
    """The alpha value of every pixel (output positions 3, 7, 11, ...) from the codes."""
    start = np.frombuffer(starts, dtype=np.int64)
    payload = np.frombuffer(payloads, dtype=np.int64)
    is_literal = np.frombuffer(literal, dtype=np.int8).astype(bool)
    per_code = (start + np.frombuffer(counts, dtype=np.int64)) // _CHANNELS - start // _CHANNELS
    alpha = np.repeat(np.where(is_literal, 0, payload).astype(np.uint8), per_code)
    first = np.cumsum(per_code) - per_code  # each code's first pixel
    bits = np.frombuffer(stream, dtype=np.uint8)
    codes = np.flatnonzero(is_literal & (per_code > 0))
    done = np.cumsum(per_code[codes])
    for lo, hi in _chunks(done, _PIXELS_PER_PASS):
        chunk = codes[lo:hi]
        n = per_code[chunk]
        code = np.repeat(chunk, n)
        pixel = first[code] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        position = payload[code] + _WORD_BITS * (pixel * _CHANNELS + _CHANNELS - 1 - start[code])
        value = np.zeros(pixel.size, dtype=np.uint8)
        for bit in range(_WORD_BITS):
            value = (value << 1) | (bits[position + bit] - ord("0"))
        alpha[pixel] = value
    return alpha


def _chunks(cumulative: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) index ranges over items whose ``cumulative`` sizes grow by about ``size`` each."""
    lo = 0
    while lo < cumulative.size:
        base = cumulative[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cumulative, base + size, side="right")))
        yield lo, hi
        lo = hi


def _longest_rle(values: int) -> int:
    """Bytes the longest sensible encoding of ``values`` needs: an encoder that writes every value
    as a literal of its own (as the SDK's does for lone values) spends 14 bits on each, plus the
    7-byte header. Decoding time grows with the runs, so this also bounds the time per pixel."""
    return values * 7 // 4 + 64


def _show(value: object) -> str:
    """A value from an annotation, for a message: short, whatever its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**12:
        return "a number of over 12 digits"
    return repr(value)[:20]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _bytes(rle: list) -> np.ndarray:
    """``rle`` as uint8, refusing anything but integers 0..255."""
    try:
        array = np.asarray(rle)
    except (ValueError, TypeError) as e:
        raise AnnotationError("A brush region's RLE is not a flat list of integers.") from e
    if array.ndim != 1 or array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
        raise AnnotationError("A brush region's RLE must be a list of integers from 0 to 255.")
    return array.astype(np.uint8)


class _BitReader:
    """Reads big-endian unsigned fields from ASCII digits '0' and '1'."""

    def __init__(self, bits: bytes) -> None:
        self.bits = bits
        self.position = 0

    def read(self, size: int) -> int:
        start = self.position
        self.skip(size)
        return int(self.bits[start : self.position], 2)

    def skip(self, size: int) -> None:
        if self.position + size > len(self.bits):
            raise AnnotationError("A brush region's RLE ends in the middle of a run.")
        self.position += size
