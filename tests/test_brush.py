"""Our brush RLE against the real label-studio-sdk: the same numbers as its mask2rle, its
decode_rle gives the mask back, and our checked decoder reads what the SDK reads, refusing
every size it could not afford before allocating it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from common.errors import AnnotationError
from common.labelstudio import brush
from common.labelstudio.brush import draw_scaled, mask_to_rle, region_mask, region_size, rle_to_mask, scaled_mask_to_rle
from tests.conftest import shared_data


def _assert_same_as_the_sdk(mask: np.ndarray) -> None:
    ours = mask_to_rle(mask)
    assert ours == mask2rle(mask)
    assert np.array_equal(decode_rle(ours).reshape(*mask.shape, 4)[:, :, 3], mask)
    assert np.array_equal(rle_to_mask(ours, mask.shape[1], mask.shape[0]), mask > 127)  # our decoder agrees
    if set(np.unique(mask).tolist()) <= {0, 255}:  # the same mask as booleans: True is 255
        assert mask_to_rle(mask == 255) == ours


def test_every_voc_mask_encodes_as_the_sdk_does(voc):
    checked = 0
    for entry in voc["images"].values():
        ids = np.asarray(Image.open(shared_data() / "voc-samples" / entry["mask"]))
        for class_id in set(np.unique(ids).tolist()) - {0, voc["ignore_index"]}:
            _assert_same_as_the_sdk((ids == class_id).astype(np.uint8) * 255)
            checked += 1
    assert checked >= len(voc["images"])


@pytest.mark.parametrize("width", range(1, 17))  # every bit remainder before the padding
def test_short_rows_pad_to_a_byte_as_the_sdk_does(width):
    rng = np.random.default_rng(width)
    _assert_same_as_the_sdk((rng.random((1, width)) > 0.5).astype(np.uint8) * 255)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((1, 1), np.uint8),
        np.full((300, 300), 255, np.uint8),  # one run of 360,000 values: chunks of 2**16 first
        np.kron(np.eye(8, dtype=np.uint8), np.ones((90, 90), np.uint8)) * 255,  # runs of every size class
        (np.random.default_rng(0).random((120, 90)) > 0.5).astype(np.uint8) * 255,  # thousands of short runs
        np.random.default_rng(1).integers(0, 256, (31, 17), dtype=np.uint8),  # any 8-bit value
    ],
    ids=["single-pixel", "long-run", "blocks", "noise", "values"],
)
def test_masks_of_every_run_length_encode_as_the_sdk_does(mask):
    _assert_same_as_the_sdk(mask)


@pytest.mark.parametrize("mask", [np.zeros((4, 4), np.int64), np.zeros((2, 2, 2), np.uint8), np.zeros((0, 5), bool)])
def test_wrong_masks_are_refused_with_a_reason(mask):
    with pytest.raises(ValueError, match="mask"):
        mask_to_rle(mask)


@pytest.mark.parametrize("seed", range(40))
def test_a_scaled_mask_encodes_as_the_sdk_encodes_it_drawn_at_full_size(seed):
    """Encoding from the working-size mask equals drawing it at the photo's size first, for up- and
    down-scaling by any ratio, sparse and dense masks, runs that continue into the next row."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, 2)
    width, height = rng.integers(1, 120, 2)
    mask = rng.random((h, w)) > (0.1, 0.5, 0.9, 1.0)[seed % 4]
    drawn = draw_scaled(mask, (int(width), int(height)))
    assert drawn.shape == (height, width)
    rle = scaled_mask_to_rle(mask, (int(width), int(height)))
    assert rle == mask2rle(drawn.astype(np.uint8) * 255)


def test_nearest_drawing_repeats_each_source_pixel_evenly():
    mask = np.array([[True, False], [False, True]])
    drawn = draw_scaled(mask, (4, 6))
    assert drawn[:3, :2].all() and drawn[3:, 2:].all() and not drawn[:3, 2:].any() and not drawn[3:, :2].any()


def _region(mask: np.ndarray, **changes) -> dict:
    h, w = mask.shape
    item = {"type": "brushlabels", "original_width": w, "original_height": h,
            "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["cat"]}}  # fmt: skip
    for key, value in changes.items():
        if key == "rle":
            item["value"]["rle"] = value
        else:
            item[key] = value
    return item


MAX_PIXELS = 60_000_000
SQUARE = np.kron(np.eye(2, dtype=np.uint8), np.ones((20, 30), np.uint8)) * 255  # 40 x 60


def test_a_checked_region_decodes_to_its_painted_pixels():
    assert region_size(_region(SQUARE), MAX_PIXELS) == (60, 40)
    assert np.array_equal(region_mask(_region(SQUARE), MAX_PIXELS), SQUARE == 255)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"original_width": 60_000, "original_height": 40_000}, "over MAX_IMAGE_PIXELS"),
        ({"original_width": 10**2200, "original_height": 10**2200}, "sides are over MAX_IMAGE_PIXELS"),
        ({"original_width": -(10**2200)}, "a number of over 12 digits"),
        ({"original_width": 0}, "positive integer"),
        ({"original_width": 6_000_000, "original_height": 1}, "at most 50 times the short one"),
        ({"original_width": 1, "original_height": 51}, "at most 50 times the short one"),
        ({"original_width": -60}, "positive integer"),
        ({"original_width": 60.0}, "positive integer"),
        ({"original_width": True}, "positive integer"),
        ({"original_height": "40"}, "positive integer"),
        ({"original_width": 6000, "original_height": 4000}, "announces 9,600 values, not the 96,000,000"),
        ({"rle": "0,1,2"}, "must be a list"),
        ({"rle": [0, 0, 37]}, "at least 7 bytes"),
        ({"rle": [0, 0, 37, 128, 57, 27, 254, "x"]}, "integers from 0 to 255"),
        ({"rle": [0, 0, 37, 128, 57, 27, 254, 300]}, "integers from 0 to 255"),
        ({"rle": [0, 0, 37, 128, 57, 27, 254, -1]}, "integers from 0 to 255"),
        ({"rle": [0, 0, 37, 128, 57, 27, 254, [1]]}, "integers|flat list"),
        ({"rle": [0, 0, 37, 128, 57, 27, 254, 1.5]}, "integers from 0 to 255"),
        ({"rle": [0, 0, 37, 128] + [0] * 50_000}, "longer than a 60x40 mask can need"),
        ({"rle": mask2rle(SQUARE)[:12]}, "ends in the middle of a run"),
        ({"rle": [0, 0, 37, 128, 0b01110111, 27, 254] + [0] * 40}, "uses 15-bit words"),
    ],
)
def test_bad_regions_are_refused_with_the_reason(changes, message):
    with pytest.raises(AnnotationError, match=message):
        region_mask(_region(SQUARE, **changes), MAX_PIXELS)


def test_a_small_rle_announcing_a_huge_image_is_refused_before_any_allocation():
    """The reported bomb: a few bytes of RLE whose header announces 4 GB of values."""
    rle = mask2rle(np.full((10, 10), 255, np.uint8))
    rle[:4] = list((4 * 32_768 * 32_767).to_bytes(4, "big"))
    bomb = _region(np.zeros((1, 1), np.uint8), original_width=32_768, original_height=32_767, rle=rle)
    with pytest.raises(AnnotationError, match="over MAX_IMAGE_PIXELS"):
        region_size(bomb, MAX_PIXELS)


def test_runs_that_overrun_the_image_are_refused():
    rle = mask2rle(np.full((10, 10), 255, np.uint8))  # one run of 400 values
    rle[:4] = list((4 * 50).to_bytes(4, "big"))  # a header of 50 pixels
    with pytest.raises(AnnotationError, match="runs cover 400 values, not the 200"):
        rle_to_mask(rle, 10, 5)


def test_decoding_a_12_megapixel_region_allocates_one_byte_a_pixel_not_four():
    """The SDK's decode_rle builds the RGBA image (48 MB here); ours the alpha only."""
    mask = np.zeros((3000, 4000), np.uint8)
    mask[500:2500, 1000:3000] = 255
    rle = mask_to_rle(mask)
    tracemalloc.start()
    try:
        decoded = rle_to_mask(rle, 4000, 3000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(decoded, mask == 255)
    assert peak < 2.5 * 12_000_000, peak


def _pack(values: np.ndarray, groups: list[tuple[bool, int]]) -> list[int]:
    """An RLE the way Label Studio's editor writes RGBA (literal groups of differing values, and
    runs): ``groups`` is (repeated, count) in order, covering ``values``."""
    sizes = (3, 4, 8, 16)
    bits = format(values.size, "032b") + format(7, "05b") + "".join(format(s - 1, "04b") for s in sizes)
    at = 0
    for repeated, count in groups:
        index = next(i for i, s in enumerate(sizes) if count - 1 < 2**s)
        bits += ("1" if repeated else "0") + format(index, "02b") + format(count - 1, f"0{sizes[index]}b")
        bits += (
            format(int(values[at]), "08b")
            if repeated
            else "".join(format(int(v), "08b") for v in values[at : at + count])
        )
        at += count
    bits += "0" * (-len(bits) % 8 or 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize("seed", range(12))
def test_literal_groups_decode_as_the_sdk_decodes_them(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 30, 2)
    values = rng.integers(0, 256, int(height * width * 4), dtype=np.uint8)
    groups, at = [], 0
    while at < values.size:
        count = int(min(values.size - at, rng.choice([1, 2, 5, 17, 300])))
        repeated = bool(rng.random() < 0.3)
        if repeated:
            values[at : at + count] = values[at]
        groups.append((repeated, count))
        at += count
    rle = _pack(values, groups)
    expected = decode_rle(rle).reshape(int(height), int(width), 4)[:, :, 3] > 127
    assert np.array_equal(rle_to_mask(rle, int(width), int(height)), expected)


def test_an_rle_with_more_runs_than_allowed_is_refused_after_reading_them(monkeypatch):
    monkeypatch.setattr(brush, "MAX_RLE_CODES", 100)
    striped = np.zeros((10, 30), np.uint8)
    striped[:, ::2] = 255  # 300 runs
    with pytest.raises(AnnotationError, match="more than 100 runs"):
        rle_to_mask(mask_to_rle(striped), 30, 10)
    assert rle_to_mask(mask_to_rle(striped[:, :10]), 10, 10).sum() == 50  # 100 runs: read
