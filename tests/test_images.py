"""Untrusted bytes in, upright RGB out, or an ImageDecodeError that says what was wrong."""

import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from common.errors import ImageDecodeError
from worker.images import PixelBudget, decode_for_model, decode_image, to_rgb

LIMIT = 60_000_000


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_real_photo_decodes_to_rgb_at_its_size(photos):
    image = decode_image(photos["2011_000003.jpg"], LIMIT)
    assert image.mode == "RGB" and image.size == (500, 338)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x00\x01garbage" * 100, "Not a recognised image format"),
        (b"<!DOCTYPE html><html><body>Login</body></html>", "web page"),
        (b'{"detail": "Authentication credentials were not provided."}', "web page or JSON"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
    ],
)
def test_non_images_are_refused_with_the_reason(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, LIMIT)


def test_truncated_jpeg_is_refused(photos):
    data = photos["2011_000003.jpg"]
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_decompression_bomb_is_refused_from_the_header():
    """Just over MAX_IMAGE_PIXELS and under Pillow's own limit (89 MP), so only our check refuses it."""
    side = 7746  # 60,000,516 pixels
    assert LIMIT < side * side < Image.MAX_IMAGE_PIXELS
    bomb = _encode(Image.new("1", (side, side)))  # 60 megapixels in a few kilobytes
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match="7746x7746 = 60,000,516 pixels, over MAX_IMAGE_PIXELS=60,000,000"):
        decode_image(bomb, LIMIT)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA", "PCX", "PPM"])
def test_only_the_supported_formats_are_opened(fmt):
    """EPS would start Ghostscript; the others are decoders nobody labels photos in."""
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    data = _encode(image, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    with pytest.raises(ImageDecodeError, match="Not a recognised image format.*JPEG, PNG"):
        decode_image(data, LIMIT)


@pytest.mark.parametrize("size", [(1, 1_000_000), (10_000, 199)])
def test_a_strip_is_refused_before_decoding(size):
    """A 1 x 60,000,000 PNG is 240 kB and within MAX_IMAGE_PIXELS, but its masks would be encoded
    row by row at that size."""
    strip = _encode(Image.new("1", size), "PNG")
    with pytest.raises(ImageDecodeError, match=f"{size[0]}x{size[1]}: .*at most 50 times the short one"):
        decode_image(strip, LIMIT)
    wide = Image.new("RGB", (50 * min(size), min(size)), (1, 2, 3))
    assert decode_image(_encode(wide, "PNG"), LIMIT).size == wide.size  # 50:1 is read


def test_pixel_limit_is_checked_before_decoding(photos):
    with pytest.raises(ImageDecodeError, match="500x338 = 169,000 pixels, over MAX_IMAGE_PIXELS=100,000"):
        decode_image(photos["2011_000003.jpg"], 100_000)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(_encode(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the left stripe is now on top


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_working_size(orientation):
    image = Image.new("RGB", (2000, 1500), (0, 128, 0))
    image.paste((255, 0, 0), (0, 0, 500, 1500))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(image, "JPEG", exif=exif, quality=90)
    decoded, size = decode_for_model(data, LIMIT, min_side=448)
    upright = (2000, 1500) if orientation == 1 else (1500, 2000)
    assert size == upright  # what masks are drawn at
    assert decoded.size == (upright[0] // 2, upright[1] // 2)  # 1/2 keeps both sides >= 448; 1/4 would not
    corner = np.asarray(decoded)[5, 5] if orientation == 1 else np.asarray(decoded)[5, -5]
    assert corner[0] > 200 and corner[1] < 60  # the red stripe, turned with the picture
    assert decode_for_model(data, LIMIT, min_side=2000)[0].size == upright  # never below what is asked


@pytest.mark.parametrize(("mode", "save"), [("CMYK", {}), ("RGB", {"progressive": True}), ("L", {})])
def test_reduced_decoding_keeps_colours_of_every_jpeg_kind(mode, save):
    image = Image.new("RGB", (2000, 1500), (200, 30, 30)).convert(mode)
    decoded, size = decode_for_model(_encode(image, "JPEG", **save), LIMIT, min_side=448)
    assert decoded.mode == "RGB" and decoded.size == (1000, 750) and size == (2000, 1500)
    expected = np.asarray(image.convert("RGB"))[5, 5]
    assert np.abs(np.asarray(decoded)[5, 5].astype(int) - expected).max() <= 4


def test_truncated_jpeg_is_refused_at_a_reduced_scale_too(photos):
    data = _encode(Image.open(io.BytesIO(photos["2011_000003.jpg"])).resize((2000, 1352)), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_for_model(data[: len(data) // 2], LIMIT, min_side=448)


def test_other_formats_are_reduced_for_the_model_before_any_conversion():
    """A transparent PNG is composited on white after it is brought near the working size, not at
    its full size (where the conversion copies cost gigabytes for a 60-megapixel picture)."""
    image = Image.new("RGBA", (1200, 900), (200, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    decoded, size = decode_for_model(_encode(image, "PNG"), LIMIT, min_side=100)
    assert size == (1200, 900) and decoded.size == (134, 100) and decoded.mode == "RGB"
    assert decode_for_model(_encode(image, "PNG"), LIMIT, min_side=600)[0].size == (1200, 900)  # no room


def test_hostile_image_structures_fail_as_decode_errors():
    """A TIFF whose strip offsets are text makes Pillow raise TypeError; a JPEG with a broken EXIF
    orientation, struct.error: both must fail their task with a reason, not the batch."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "TIFF")
    data = buffer.getvalue().replace(b"\x11\x01\x04\x00", b"\x11\x01\x02\x00")  # StripOffsets: LONG -> ASCII
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(data, LIMIT)


def scan_bomb() -> bytes:
    """A progressive JPEG whose last scan is repeated 60 times (its header reads as any other)."""
    progressive = _encode(Image.new("RGB", (640, 480), (10, 120, 200)), "JPEG", progressive=True)
    last_scan = progressive[progressive.rindex(b"\xff\xda") : -2]
    return progressive[:-2] + last_scan * 60 + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    """Each scan of a progressive JPEG is a pass over every pixel: a thousand tiny scans make a
    200 kB file decode for a minute. An ordinary progressive JPEG has about ten."""
    progressive = _encode(Image.new("RGB", (640, 480), (10, 120, 200)), "JPEG", progressive=True)
    assert 1 < progressive.count(b"\xff\xda") <= 20
    assert decode_image(progressive, LIMIT).size == (640, 480)
    assert Image.open(io.BytesIO(scan_bomb())).format == "JPEG"
    with pytest.raises(ImageDecodeError, match="scans; prelabel decodes at most 64"):
        decode_for_model(scan_bomb(), LIMIT, min_side=448)


@pytest.mark.parametrize("mode", ["P", "1", "I;16"])
def test_modes_that_cannot_be_reduced_still_decode_for_the_model(mode):
    image = Image.new("L", (1000, 800), 90).convert(mode) if mode != "I;16" else Image.new("I;16", (1000, 800), 9000)
    decoded, size = decode_for_model(_encode(image, "PNG"), LIMIT, min_side=100)
    assert decoded.mode == "RGB" and size == (1000, 800)


def test_a_decode_that_waits_too_long_for_the_pixel_budget_fails_its_task():
    budget = PixelBudget(100)
    with (
        budget.hold(60),
        pytest.raises(ImageDecodeError, match="waiting for other large images"),
        budget.hold(60, timeout=0.2),
    ):
        pass


def test_the_pixel_budget_lets_one_large_decode_at_a_time():
    budget = PixelBudget(100)
    inside, most = [0], [0]
    lock = threading.Lock()

    def decode() -> None:
        with budget.hold(60):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1  # 60 + 60 > 100: never two at once
    with budget.hold(500):  # larger than the whole budget: waits for all of it, then runs
        pass


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(_encode(cmyk, "JPEG", quality=95), LIMIT)
    r, g, b = np.asarray(decoded)[4, 4]
    assert decoded.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_sixteen_bit_keeps_its_full_range():
    array = np.zeros((4, 4), dtype=np.uint16)
    array[:2] = 65535
    array[2:] = 32896  # mid grey in 16 bits
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(decode_image(_encode(image), LIMIT))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[3, 0].tolist() == [128, 128, 128]


def test_float_and_32_bit_images_are_stretched_to_8_bits():
    floats = Image.fromarray(np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32))
    assert np.asarray(decode_image(_encode(floats, "TIFF"), LIMIT))[:, :, 0].tolist() == [[0, 127], [191, 255]]
    wide = Image.fromarray(np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(decode_image(_encode(wide, "TIFF"), LIMIT))[:, :, 0].tolist() == [[0, 100], [200, 255]]


def test_sixteen_bit_conversion_makes_no_full_size_float_copy():
    """Traced allocations stay under 6 bytes a pixel (the 16-bit copy numpy reads is 2; a float64 copy
    alone would be 8, and the old conversion peaked at 17)."""
    image = Image.fromarray(np.full((2000, 3000), 40000, dtype=np.uint16))
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.asarray(rgb)[0, 0].tolist() == [155, 155, 155]
    assert peak < 6 * 2000 * 3000, peak


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode):
    rgba = Image.new("RGBA", (6, 6), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 3, 6))
    image = rgba if mode == "RGBA" else rgba.convert(mode) if mode == "LA" else rgba.convert("P")
    if mode == "P":
        image = Image.new("P", (6, 6), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.paste(1, (0, 0, 3, 6))
        image.info["transparency"] = 0
    decoded = np.asarray(decode_image(_encode(image), LIMIT))
    assert decoded[0, 5].tolist() == [255, 255, 255]  # transparent half
    assert decoded[0, 0].tolist() != [255, 255, 255]  # opaque half keeps its colour


@pytest.mark.parametrize("mode", ["1", "L", "F"])
def test_other_modes_become_rgb(mode):
    image = Image.new("L", (5, 5), 200).convert(mode)
    data = _encode(image, "TIFF" if mode == "F" else "PNG")
    assert decode_image(data, LIMIT).mode == "RGB"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 768), (608, 448)),  # large photo: short side brought to 448, 4:3 kept (rounded up to 16)
        ((512, 384), (512, 384)),  # smaller than the working size: its own resolution, never upsampled
        ((500, 375), (512, 384)),  # ... rounded up to whole patches, as TagCLIP does
        ((4000, 500), (896, 112)),  # a panorama: shrunk until the long side is twice the working size
        ((10, 10), (16, 16)),  # tiny: one patch
    ],
)
def test_working_size(size, expected):
    from worker.model.preprocess import working_size

    assert working_size(*size, short_side=448, patch=16) == expected
