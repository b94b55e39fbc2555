"""Masks: the dense heads, mask extraction on planted inputs, the shared trunk, and Label
Studio's brush RLE on real VOC masks."""

from __future__ import annotations

import base64
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from common.jobs import BrushControl, ChoicesControl, ClassLabel, ImageTask, PredictJob
from common.labelstudio.brush import draw_scaled
from common.settings import DENSE_HEADS
from tests.tiny import build_tiny_clip
from worker.images import decode_for_model
from worker.loading import load_clip
from worker.model import dense, vit
from worker.model.bundle import autocast
from worker.model.tagclip import local_scores, reidentify
from worker.predictor import Predictor
from worker.vocabulary import ClassBank


def _text(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _planted_features(plan: np.ndarray, text: torch.Tensor) -> torch.Tensor:
    """An "identity-like model": every patch's feature is the text embedding of its planted class."""
    return text[torch.from_numpy(plan).flatten()]


def drawn(mask: dense.Mask) -> np.ndarray:
    """The mask at the image's size, as Label Studio shows it."""
    return draw_scaled(mask.region, mask.size)


def test_masks_follow_the_planted_regions_and_background_stays_unlabeled():
    text = _text(4)  # classes 0, 1 are labels; 2, 3 background words
    plan = np.full((6, 8), 2)
    plan[0:3, 0:4] = 0
    plan[3:6, 4:8] = 1
    plan[0:3, 6:8] = 3
    logits = dense.class_logits(_planted_features(plan, text), text, (6, 8))
    masks = dense.masks_from_logits(logits, n_labels=2, image_size=(400, 300), min_area=0.0)
    assert [m.index for m in masks] == [0, 1]
    expected = np.kron(plan, np.ones((50, 50), dtype=int))  # each patch is 50x50 pixels of a 400x300 image
    for m in masks:
        full = drawn(m)
        assert full.shape == (300, 400)
        iou = (full & (expected == m.index)).sum() / (full | (expected == m.index)).sum()
        assert iou > 0.95
        assert 0.5 < m.score <= 1.0
    labelled = drawn(masks[0]) | drawn(masks[1])
    background = expected >= 2
    # pixels won by background words stay unlabeled (up to the interpolated seams between patches)
    assert labelled[background].mean() < 0.01


def test_small_regions_are_dropped():
    text = _text(3)
    plan = np.full((10, 10), 2)
    plan[0:5, 0:5] = 0  # 25% of the image
    plan[8, 8] = 1  # one patch: 1% of the image
    logits = dense.class_logits(_planted_features(plan, text), text, (10, 10))
    kept = dense.masks_from_logits(logits, 2, (100, 100), min_area=0.02)
    assert [m.index for m in kept] == [0]
    assert [m.index for m in dense.masks_from_logits(logits, 2, (100, 100), min_area=0.0)] == [0, 1]


def test_mask_score_is_the_mean_probability_inside():
    logits = torch.zeros(2, 4, 4)
    logits[0, :, :2] = 2.0  # class 0 wins the left half with p = e^2 / (e^2 + 1) ...
    logits[1, :, 2:] = 1.0  # ... and class 1 (a background word) the right half
    (mask,) = dense.masks_from_logits(logits, 1, (4, 4), min_area=0.0)
    assert drawn(mask)[:, :2].all() and not drawn(mask)[:, 2:].any()
    assert mask.score == pytest.approx(float(torch.tensor([2.0, 0.0]).softmax(0)[0]), abs=1e-6)


def test_a_label_wins_the_pixels_where_it_beats_every_competitor_of_hundreds():
    torch.manual_seed(0)
    logits = 3 * torch.randn(302, 12, 12)  # 2 labels, 300 competitors (background words, distractors)
    logits[:2] += 6  # labels that win about half the pixels between them
    masks = dense.masks_from_logits(logits, 2, (12, 12), min_area=0)  # image = grid: no resampling
    winner = logits.argmax(dim=0).numpy()
    assert {m.index for m in masks} == {0, 1}
    assert 0.2 < (winner < 2).mean() < 0.8  # competitors win the rest
    for m in masks:
        assert (m.region == (winner == m.index)).all()


def test_sigmoid_masks_leave_low_scores_unlabeled():
    logits = torch.full((2, 4, 4), -5.0)
    logits[1, 1:3, 1:3] = 5.0
    (mask,) = dense.masks_from_logits(logits, 2, (4, 4), min_area=0.0, activation="sigmoid", floor=0.5)
    assert mask.index == 1 and drawn(mask).sum() == 4


def test_large_images_get_full_size_masks_without_full_size_probability_maps():
    text = _text(2)
    plan = np.zeros((4, 6), dtype=int)
    plan[:, 3:] = 1
    logits = dense.class_logits(_planted_features(plan, text), text, (4, 6))
    (left, right) = dense.masks_from_logits(logits, 2, (3000, 2000), min_area=0.0)
    assert drawn(left).shape == (2000, 3000)
    assert drawn(left)[:, :1400].all() and drawn(right)[:, 1600:].all()


def test_clearclip_block_is_qq_attention_without_residual_or_ffn():
    """Checked against torch's own attention with the key projection replaced by the query's."""
    visual = build_tiny_clip().visual
    block = visual.transformer.resblocks[-1]
    x = vit.embed(visual, torch.randn(1, 3, 64, 64))
    twin = copy.deepcopy(block.attn)
    D = x.shape[-1]
    with torch.no_grad():
        twin.in_proj_weight[D : 2 * D] = block.attn.in_proj_weight[:D]
        twin.in_proj_bias[D : 2 * D] = block.attn.in_proj_bias[:D]
        expected = twin(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False)[0]
        ours = dense.dense_block(block, x, "clearclip", (8, 8))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_naclip_block_is_kk_attention_with_a_gaussian_neighbourhood():
    visual = build_tiny_clip().visual
    block = visual.transformer.resblocks[-1]
    x = vit.embed(visual, torch.randn(1, 3, 48, 64))
    twin = copy.deepcopy(block.attn)
    D = x.shape[-1]
    bias = dense.neighbourhood_bias((6, 8), 5.0, x.device)
    with torch.no_grad():
        twin.in_proj_weight[:D] = block.attn.in_proj_weight[D : 2 * D]
        twin.in_proj_bias[:D] = block.attn.in_proj_bias[D : 2 * D]
        expected = twin(block.ln_1(x), block.ln_1(x), block.ln_1(x), attn_mask=bias, need_weights=False)[0]
        ours = dense.dense_block(block, x, "naclip", (6, 8))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert bias.shape == (49, 49) and bias[0].abs().sum() == 0 and bias[:, 0].abs().sum() == 0
    assert bias[1, 1] == 1.0 and bias[1, 2] == pytest.approx(np.exp(-1 / 50)) and torch.equal(bias, bias.T)


def _data_uri(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def predictor(make_settings) -> Predictor:
    settings = make_settings(background_words=(), mask_min_area=0.0)
    return Predictor(settings, load_clip(settings))


LABELS = tuple(ClassLabel(name, (name,)) for name in ("cat", "dog", "person", "car"))


def test_shared_trunk_gives_the_same_tags_as_tagclip_alone(predictor, photos):
    image = Image.open(io.BytesIO(photos["2011_000003.jpg"])).convert("RGB")
    choices = ChoicesControl("tags", "image", LABELS, True)
    brush = BrushControl("mask", "image", LABELS)
    job = PredictJob("v", "image", (choices,), (ImageTask(1, _data_uri(image, quality=100)),), (brush,))
    shared = predictor.predict(job).tasks[0]
    assert shared.masks  # the dense head ran on the same trunk

    data = base64.b64decode(job.tasks[0].image_url.split(",")[1])
    decoded, size = decode_for_model(data, predictor.settings.max_image_pixels, predictor.settings.image_size)
    bundle, cfg = predictor.bundle, predictor.config
    pixels = predictor.prepare_image(decoded, size).pixels[None]
    bank = ClassBank.build(LABELS, ())
    text = predictor.text.classes(bank.synonyms)
    with torch.inference_mode(), autocast(bundle):  # the precision the predictor ran in
        alone = reidentify(bundle, local_scores(bundle, pixels, text, len(LABELS), cfg), text, cfg, 4)[0]
    expected = {label.name: score for label, score in zip(LABELS, alone.tolist(), strict=True)}
    assert shared.choices[0].scores == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("scale", [1, 10])  # 1200 x 700: decoded at a reduced scale, masks at full size
def test_masks_have_the_upright_image_size(predictor, orientation, scale):
    image = Image.new("RGB", (120, 70), (30, 140, 40))
    image.paste((200, 40, 40), (10, 10, 60, 60))
    image = image.resize((120 * scale, 70 * scale))
    exif = Image.Exif()
    exif[0x0112] = orientation
    task = ImageTask(5, _data_uri(image, exif=exif, quality=95))
    job = PredictJob("v", "image", (), (task,), (BrushControl("mask", "image", LABELS),))
    result = predictor.predict(job).tasks[0]
    upright = (120 * scale, 70 * scale) if orientation == 1 else (70 * scale, 120 * scale)
    assert (result.image_width, result.image_height) == upright
    assert result.masks
    for mask in result.masks:
        decoded = decode_rle(mask.rle).reshape(upright[1], upright[0], 4)[:, :, 3]
        assert decoded.any() and set(np.unique(decoded)) <= {0, 255}


def test_maskclip_baseline_is_the_value_path_with_residual_and_ffn():
    """Identity attention: the same as a self-attending block whose off-diagonal is masked out."""
    visual = build_tiny_clip().visual
    block = visual.transformer.resblocks[-1]
    x = vit.embed(visual, torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        ours = dense.dense_block(block, x, "maskclip", (8, 8))
        expected = vit.self_attending_block(block, x, penalty=-1e4)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_the_setting_offers_the_heads_the_model_has():
    assert DENSE_HEADS == dense.HEADS
    with pytest.raises(ValueError, match="Unknown dense head"):
        dense.dense_block(None, torch.zeros(1, 2, 4), "nope", (1, 1))  # type: ignore[arg-type]


def test_windows_slide_at_half_their_side_and_the_last_one_is_flush_with_the_end():
    assert dense.window_starts(224, 224, 112) == [0]
    assert dense.window_starts(448, 224, 112) == [0, 112, 224]
    assert dense.window_starts(600, 224, 112) == [0, 112, 224, 336, 376]
    assert dense.window_starts(100, 224, 112) == [0]  # smaller than a window: one, the image itself


def test_sliding_features_average_each_windows_own_features_where_they_overlap():
    """ClearCLIP's and NACLIP's slide inference, recomputed window by window."""
    model = build_tiny_clip()
    visual = model.visual
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 64, 96)  # native 64: windows at x = 0 and 32 (stride 32)
    with torch.no_grad():
        got = dense.sliding_features(visual, pixels, "naclip", batch_size=1).reshape(1, 8, 12, -1)

        def window(x: int) -> torch.Tensor:
            crop = pixels[:, :, :, x : x + 64]
            tokens = vit.run_blocks(visual, vit.embed(visual, crop), range(len(visual.transformer.resblocks) - 1))
            return dense.dense_features(visual, tokens, (8, 8), "naclip").reshape(1, 8, 8, -1)

        left, right = window(0), window(32)
    torch.testing.assert_close(got[:, :, :4], left[:, :, :4])  # only the first window covers these
    torch.testing.assert_close(got[:, :, 4:8], (left[:, :, 4:] + right[:, :, :4]) / 2)
    torch.testing.assert_close(got[:, :, 8:], right[:, :, 4:])
    whole = torch.randn(2, 3, 64, 64)  # one window: the plain dense features
    with torch.no_grad():
        tokens = vit.run_blocks(visual, vit.embed(visual, whole), range(len(visual.transformer.resblocks) - 1))
        torch.testing.assert_close(dense.sliding_features(visual, whole, "clearclip", 4),
                                   dense.dense_features(visual, tokens, (8, 8), "clearclip"))  # fmt: skip


def test_pamr_snaps_blurred_scores_to_the_images_edge():
    """Two flat colours meet at column 20; the class scores blur across it (as upsampled patch
    logits do): PAMR moves the argmax boundary onto the colour edge, and leaves flat scores flat."""
    image = torch.zeros(3, 32, 48)
    image[:, :, 20:] = 1.0
    image += 0.01 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(-1, 1, 48)[None].expand(32, 48)
    logits = torch.stack([-(ramp - 0.2), ramp - 0.2]) * 3  # boundary at column ~28, 8 columns off
    truth = torch.zeros(32, 48, dtype=torch.long)
    truth[:, 20:] = 1
    before = (logits.argmax(0) == truth).float().mean()
    after = (dense.pamr(image, logits).argmax(0) == truth).float().mean()
    assert before < 0.85 and after > 0.97
    flat = torch.ones(2, 32, 48)
    assert torch.allclose(dense.pamr(image, flat), flat, atol=1e-5)
