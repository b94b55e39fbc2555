"""Our vectorised brush RLE against the real label-studio-sdk: the same numbers as its mask2rle,
and its decode_rle gives the mask back."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from tests.conftest import shared_data
from worker.brush import draw_scaled, mask_to_rle, scaled_mask_to_rle


def _assert_same_as_the_sdk(mask: np.ndarray) -> None:
    ours = mask_to_rle(mask)
    assert ours == mask2rle(mask)
    assert np.array_equal(decode_rle(ours).reshape(*mask.shape, 4)[:, :, 3], mask)
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
