"""CLIPSelf on a tiny model and real VOC corrections."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.conftest import shared_data
from worker.model import dense, vit
from worker.model.text import TextEmbedder
from worker.training.clipself import (
    CLIPSelfConfig,
    grid_cells,
    student_outputs,
    train_clipself,
    trainable_blocks,
    trained_paths,
)
from worker.training.corrections import Correction
from worker.training.loop import TrainingCancelled
from worker.training.zegclip import load_voc_folder

CFG = CLIPSelfConfig(steps=40, batch_size=2, lr=1e-3, size=64)


@pytest.fixture(scope="module")
def setup():
    import tempfile
    from pathlib import Path

    from common.settings import Settings
    from tests.tiny import save_tiny_clip
    from worker.loading import load_clip

    bundle = load_clip(Settings(model_checkpoint=str(save_tiny_clip(Path(tempfile.mkdtemp()) / "tiny"))))
    samples, classes = load_voc_folder(shared_data() / "voc-samples")
    corrections = [Correction(i, None, {}, s.mask, s.labels, s.image) for i, s in enumerate(samples[:6])]
    names = classes + ["sky", "grass"]
    text = TextEmbedder(bundle).classes([(n,) for n in names])
    return bundle, corrections, text, {n: i for i, n in enumerate(names)}


def _train(setup, cfg=CFG, **kwargs):
    bundle, corrections, text, index = setup
    return train_clipself(bundle.visual, bundle.visual, corrections, text, index, bundle.mean, bundle.std, cfg,
                          **kwargs)  # fmt: skip


def test_training_lowers_the_loss_and_leaves_teacher_and_frozen_weights_untouched(setup):
    bundle = setup[0]
    before = copy.deepcopy(bundle.visual.state_dict())
    weights, report = _train(setup)
    assert sum(report.losses[-10:]) < 0.7 * sum(report.losses[:10])
    after = bundle.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher (and the input model) unchanged
    blocks = trainable_blocks(bundle.visual, CFG)
    assert list(blocks) == [3, 4, 5]
    assert set(weights) == {k for k in before if k.startswith(tuple(f"transformer.resblocks.{i}." for i in blocks))}
    assert any(not torch.equal(weights[k], before[k]) for k in weights)  # trained blocks moved


def test_what_is_saved_is_the_alpha_ensemble(setup):
    start = setup[0].visual.state_dict()
    student, _ = _train(setup, CLIPSelfConfig(**{**CFG.__dict__, "alpha": 1.0}))
    ensemble, _ = _train(setup, CFG)  # same seed, same steps, alpha 0.7
    for k in ensemble:
        torch.testing.assert_close(ensemble[k], 0.7 * student[k] + 0.3 * start[k], atol=1e-5, rtol=1e-4)


def test_a_cancelled_run_stops_between_steps(setup):
    steps = []
    with pytest.raises(TrainingCancelled):
        _train(setup, progress=lambda step, loss: steps.append(step), should_stop=lambda: len(steps) >= 3)
    assert steps == [0, 1, 2]


@pytest.mark.parametrize("head", dense.HEADS)
def test_the_student_trains_the_features_the_service_serves(setup, head):
    """The dense path CLIPSelf trains is the one masks are drawn from (``DENSE_HEAD``), and the
    embedding it holds is the one the predictor's tags read."""
    visual = setup[0].visual
    pixels = torch.randn(2, 3, 64, 48)
    (features,), embedding = student_outputs(visual, pixels, [head])
    grid = (8, 6)
    trunk = vit.run_blocks(visual, vit.embed(visual, pixels), range(len(visual.transformer.resblocks) - 1))
    served = dense.dense_features(visual, trunk, grid, head)  # [B, h*w, E], as the predictor computes it
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), served, atol=1e-5, rtol=1e-4)
    plain = torch.nn.functional.normalize(vit.encode_tokens(visual, pixels)[:, 0], dim=-1)
    torch.testing.assert_close(embedding, plain, atol=1e-5, rtol=1e-4)


def test_with_clearclip_served_the_last_block_s_ffn_is_left_alone(setup):
    """ClearCLIP drops the last block's residual and FFN: training its path must not move them
    (CLIPSelf's own MaskCLIP path does), unless the class token's term needs them."""
    start = setup[0].visual.state_dict()
    ffn = [k for k in start if k.startswith("transformer.resblocks.5.mlp.")]
    only = {"dense_head": "clearclip", "global_weight": 0.0, "tag_path": False}
    served, _ = _train(setup, CLIPSelfConfig(**{**CFG.__dict__, **only}))
    assert all(torch.equal(served[k], start[k]) for k in ffn)
    assert any(not torch.equal(served[k], start[k]) for k in served if k not in ffn)
    paper, _ = _train(setup, CLIPSelfConfig(**{**CFG.__dict__, "dense_head": "maskclip", "global_weight": 0.0}))
    assert any(not torch.equal(paper[k], start[k]) for k in ffn)


def _drift(setup, weights) -> float:
    """Mean 1 - cos between the trained and the base model's image embeddings of the training photos."""
    from worker.checkpoints import version_visual
    from worker.training.clipself import letterbox

    bundle, corrections = setup[0], setup[1]
    pixels = torch.stack([letterbox(c.image, 64, bundle.mean, bundle.std)[0] for c in corrections])
    with torch.no_grad():
        tuned = student_outputs(version_visual(bundle.visual, weights), pixels, [])[1]
        base = student_outputs(bundle.visual, pixels, [])[1]
    return float(1 - torch.nn.functional.cosine_similarity(tuned, base).mean())


def test_the_class_token_is_held_where_the_base_model_had_it(setup):
    cfg = {**CFG.__dict__, "dense_head": "clearclip", "alpha": 1.0}
    free, _ = _train(setup, CLIPSelfConfig(**{**cfg, "global_weight": 0.0}))
    held, _ = _train(setup, CLIPSelfConfig(**cfg))
    assert _drift(setup, held) < 0.5 * _drift(setup, free)


def test_a_run_trains_the_served_path_and_the_one_tagclip_reads():
    assert trained_paths(CLIPSelfConfig(dense_head="clearclip")) == ("clearclip", "maskclip")
    assert trained_paths(CLIPSelfConfig(dense_head="naclip", tag_path=False)) == ("naclip",)
    assert trained_paths(CLIPSelfConfig(dense_head="maskclip")) == ("maskclip",)  # the paper's, once


def test_grid_cells_follow_clipself_splits():
    rng = random.Random(0)
    for _ in range(50):
        cells = grid_cells(rng, 10)
        assert 1 <= len(cells) <= 10
        for x0, y0, x1, y1 in cells:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalised(image) -> torch.Tensor:
    import numpy as np

    array = (np.asarray(image, dtype=np.float32) / 255 - np.array(MEAN, dtype=np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _photo(width: int, height: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_teacher_targets_are_crops_of_the_original_image_resized_bicubic_and_centred_on_black():
    """As CLIPSelf's data.py: the box cut from the original photo (not from the student's resized
    input), its longest side resized to the teacher's input with bicubic, centred on black."""
    from PIL import Image

    from worker.training.clipself import teacher_crops

    photo = _photo(90, 60)
    box = (0.1, 0.2, 0.6, 0.5)  # 45 x 18 pixels of the photo
    (crop,) = teacher_crops(photo, [box], 32, MEAN, STD)
    expected = Image.new("RGB", (32, 32), (0, 0, 0))
    piece = photo.crop((9, 12, 54, 30)).resize((32, 13), Image.Resampling.BICUBIC)
    expected.paste(piece, (0, 9))
    torch.testing.assert_close(crop, _normalised(expected), atol=1e-5, rtol=0)


def test_student_input_keeps_the_aspect_and_its_boxes_land_on_the_same_pixels():
    """CLIPSelf resizes the longest side and pads black at the bottom and right; a box of the
    photo is the same box of the canvas scaled by the part the photo covers."""
    from PIL import Image

    from worker.training.clipself import from_canvas, letterbox, to_canvas

    photo = _photo(80, 40)
    pixels, cover = letterbox(photo, 32, MEAN, STD)
    assert cover == (0.0, 0.0, 1.0, 0.5)
    expected = Image.new("RGB", (32, 32), (0, 0, 0))
    expected.paste(photo.resize((32, 16), Image.Resampling.BICUBIC), (0, 0))
    torch.testing.assert_close(pixels, _normalised(expected), atol=1e-5, rtol=0)
    box = (0.25, 0.5, 0.75, 1.0)
    assert to_canvas(box, cover) == (0.25, 0.25, 0.75, 0.5)
    assert from_canvas(to_canvas(box, cover), cover) == box


def test_a_square_crop_cuts_image_mask_and_boxes_alike():
    """view="crop": a random square of side the short side; the mask is the same pixels' labels,
    a box is clipped to the square (in its fractions) or dropped outside it; corrections without a
    mask stay whole, since their tags may lie outside any crop."""
    import numpy as np

    from worker.training.clipself import square_crop

    photo = _photo(60, 30)
    mask = np.zeros((30, 60), dtype=np.uint8)
    mask[:, :12], mask[5:9, 50:] = 1, 2
    left_box, right_box = ("a", (0.0, 0.0, 0.2, 1.0)), ("b", (0.9, 0.5, 1.0, 1.0))
    correction = Correction(1, None, {"tags": {"a", "b"}}, mask, ("a", "b"), photo, boxes=[left_box, right_box])
    seen = set()
    for seed in range(12):
        crop = square_crop(correction, random.Random(seed))
        assert crop.image.size == (30, 30) and crop.mask.shape == (30, 30) and crop.size == correction.size
        left = next(x for x in range(31) if np.array_equal(np.asarray(crop.image), np.asarray(photo)[:, x : x + 30]))
        seen.add(left)
        assert np.array_equal(crop.mask, mask[:, left : left + 30])
        boxes = dict(crop.boxes)
        if left < 12:
            assert boxes["a"] == pytest.approx((0.0, 0.0, (12 - left) / 30, 1.0))
        else:
            assert "a" not in boxes
        if left + 30 > 54:
            assert boxes["b"] == pytest.approx(((54 - left) / 30 if left < 54 else 0.0, 0.5, 1.0, 1.0))
        else:
            assert "b" not in boxes
    assert len(seen) > 3  # the square moves
    tags_only = Correction(2, None, {"tags": {"a"}}, None, (), photo)
    boxes_only = Correction(2, None, {"tags": {"a", "b"}}, None, (), photo, boxes=[left_box])
    empty_mask = Correction(2, None, {"tags": {"a"}}, np.zeros((0, 0), dtype=np.uint8), (), photo)
    for whole in (tags_only, boxes_only, empty_mask):  # a crop could lose what their tags name
        assert square_crop(whole, random.Random(0)) is whole
    square = Correction(3, None, {}, mask[:, :30].copy(), ("a", "b"), _photo(30, 30))
    assert square_crop(square, random.Random(0)) is square
    with pytest.raises(ValueError, match="view"):
        train_clipself(None, None, [correction], torch.zeros(2, 8), {"a": 0, "b": 1}, MEAN, STD,
                       CLIPSelfConfig(view="squash"))  # fmt: skip


def test_clipself_trains_on_square_crops(setup):
    cfg = CLIPSelfConfig(**{**CFG.__dict__, "steps": 3, "view": "crop"})
    weights, report = _train(setup, cfg)
    assert weights and report.steps == 3 and all(torch.isfinite(v).all() for v in weights.values())
