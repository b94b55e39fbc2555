"""ZegCLIP: shapes, the loss, a short real training run on VOC photos, checkpoints, and its use
for a project's masks."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from common.jobs import BrushControl, ClassLabel, ImageTask, PredictJob
from common.settings import Settings
from tests.conftest import shared_data
from tests.tiny import TINY_CLIP, save_tiny_clip
from worker.checkpoints import load_head, save_head
from worker.loading import load_clip
from worker.model.zegclip import (
    IGNORE,
    NO_CLASS,
    ZegCLIP,
    ZegCLIPConfig,
    segmentation_loss,
)
from worker.predictor import Predictor
from worker.training.zegclip import (
    THRESHOLDS,
    TrainingSample,
    calibrate_threshold,
    calibration_split,
    has_label,
    load_voc_folder,
    mean_iou,
    schedule,
    train_zegclip,
)

CFG = ZegCLIPConfig(decoder_heads=4)  # the tiny model's 64-dim embeddings split into 4 heads


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_clip(Settings(model_checkpoint=str(save_tiny_clip(tmp_path_factory.mktemp("m") / "tiny"))))


@pytest.fixture(scope="module")
def voc_pair():
    samples, _ = load_voc_folder(shared_data() / "voc-samples")
    by_name = {s.labels: s for s in samples}
    pair = [by_name[("aeroplane",)], by_name[("bird",)]]
    return pair, ["aeroplane", "bird"]


@pytest.fixture(scope="module")
def trained(bundle, voc_pair):
    """600 steps on two VOC photos at 64 px: about 15 s on two CPU cores."""
    samples, classes = voc_pair
    before = mean_iou(bundle, ZegCLIP(bundle.visual, CFG).eval(), samples, classes, 64)
    model, report = train_zegclip(bundle, samples, classes, CFG, steps=600, batch_size=4, lr=1e-3, size=64)
    return model, report, before


def _text(n: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 64, generator=torch.Generator().manual_seed(n)), dim=-1)


@pytest.mark.parametrize("classes", [1, 3, 7])
def test_mask_logits_have_one_map_per_class(bundle, classes):
    model = ZegCLIP(bundle.visual, CFG).eval()
    with torch.no_grad():
        logits = model(bundle.visual, torch.randn(2, 3, 48, 80), _text(classes))
    assert logits.shape == (2, classes, 6, 10)


def test_a_class_mask_does_not_depend_on_the_other_classes_asked(bundle):
    model = ZegCLIP(bundle.visual, CFG).eval()
    text = _text(5)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        together = model(bundle.visual, pixels, text)
        alone = model(bundle.visual, pixels, text[2:3])
    torch.testing.assert_close(alone[0, 0], together[0, 2], atol=1e-5, rtol=1e-4)


def test_backbone_stays_out_of_the_trainable_parameters(bundle):
    model = ZegCLIP(bundle.visual, CFG)
    names = [name for name, _ in model.named_parameters()]
    assert names and all(name.startswith(("prompts.", "head.")) for name in names)
    assert model.prompts.deep.shape == (5, 10, 64)  # one prompt set per block after the first


def test_loss_is_small_for_right_answers_and_ignores_ignored_pixels():
    target = torch.full((1, 4, 4), NO_CLASS)
    target[0, :2, :2] = 0
    target[0, 2:, 2:] = 1
    right = torch.full((1, 2, 4, 4), -8.0)
    right[0, 0, :2, :2] = 8.0
    right[0, 1, 2:, 2:] = 8.0
    wrong = -right
    assert segmentation_loss(right, target, CFG) < 0.01 < segmentation_loss(wrong, target, CFG)

    ignored = target.clone()
    ignored[0, 0, :] = IGNORE
    changed = right.clone()
    changed[0, :, 0, :] = 3.0  # different logits, but only where nothing is known
    torch.testing.assert_close(segmentation_loss(changed, ignored, CFG), segmentation_loss(right, ignored, CFG))


def test_loss_is_the_reference_focal_and_dice_normalised_per_mask():
    """Written pixel by pixel from ZegCLIP's criterion: per class map, the mean over pixels of
    0.25/0.75-weighted (1 - p_t)^2 * BCE; summed over all B x C maps and divided by the number of
    masks present; dice (smooth 1) averaged over the masks present; 100 x focal + 1 x dice."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(-1, 2, (2, 5, 5))  # classes 0 and 1 and "no class"; class 2 absent
    B, C, H, W = logits.shape
    focal_sum, dice_terms, masks = 0.0, [], 0
    for b in range(B):
        for c in range(C):
            y = [[1.0 if int(target[b, i, j]) == c else 0.0 for j in range(W)] for i in range(H)]
            terms, inter, total = [], 0.0, 0.0
            for i in range(H):
                for j in range(W):
                    p = 1 / (1 + np.exp(-float(logits[b, c, i, j])))
                    t = y[i][j]
                    p_t = p * t + (1 - p) * (1 - t)
                    weight = 0.25 if t else 0.75
                    terms.append(weight * (1 - p_t) ** 2 * -np.log(p_t))
                    inter, total = inter + p * t, total + p + t
            focal_sum += sum(terms) / len(terms)
            if any(any(row) for row in y):
                masks += 1
                dice_terms.append(1 - (2 * inter + 1) / (total + 1))
    expected = 100 * focal_sum / masks + np.mean(dice_terms)
    assert float(segmentation_loss(logits, target, CFG)) == pytest.approx(expected, rel=1e-4)


def test_patch_features_enter_the_decoder_as_they_are_or_projected(bundle):
    """project_patches=False is the official use_proj=False: no Linear or LayerNorm on the patch
    features; True puts both in front of the decoder (and changes what it reads)."""
    plain = ZegCLIP(bundle.visual, ZegCLIPConfig(decoder_heads=4, project_patches=False))
    assert not any(name.startswith("head.input") for name, _ in plain.named_parameters())
    torch.manual_seed(0)
    projected = ZegCLIP(bundle.visual, ZegCLIPConfig(decoder_heads=4, project_patches=True)).eval()
    names = {name for name, _ in projected.named_parameters() if name.startswith("head.input")}
    assert names == {"head.input_proj.weight", "head.input_proj.bias", "head.input_norm.weight", "head.input_norm.bias"}
    image, patches = F.normalize(torch.randn(2, 64), dim=-1), F.normalize(torch.randn(2, 12, 64), dim=-1)
    head = projected.head
    with torch.no_grad():
        seen = head(image, patches, _text(3), (3, 4))
        head.input_norm.bias.add_(1.0)  # what the decoder reads goes through the projection
        assert not torch.allclose(head(image, patches, _text(3), (3, 4)), seen)


@pytest.mark.parametrize("projected", [False, True])
def test_a_head_saved_without_the_projection_option_loads_as_it_was_trained(bundle, tmp_path, projected):
    """Heads written before ``project_patches`` existed have no such key: the weights say whether
    they have a projection (the first heads did, those of the next versions did not)."""
    import json

    from worker.checkpoints import HEAD_CONFIG

    model = ZegCLIP(bundle.visual, ZegCLIPConfig(decoder_heads=4, project_patches=projected)).eval()
    save_head(model, tmp_path / "head", {})
    info = json.loads((tmp_path / "head" / HEAD_CONFIG).read_text())
    del info["config"]["project_patches"]
    (tmp_path / "head" / HEAD_CONFIG).write_text(json.dumps(info))
    loaded, _ = load_head(tmp_path / "head", bundle.visual)
    assert loaded.cfg.project_patches is projected and (loaded.head.input_proj is not None) is projected
    pixels, text = torch.randn(1, 3, 64, 64), _text(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(bundle.visual, pixels, text), model(bundle.visual, pixels, text))


def test_short_training_on_real_photos_lowers_the_loss_and_raises_iou(trained, bundle, voc_pair):
    model, report, before = trained
    losses = report.losses
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    after = mean_iou(bundle, model, *voc_pair, 64)
    assert after > before + 0.3, (before, after)


def test_checkpoint_round_trip_gives_identical_logits(trained, bundle, tmp_path):
    model = trained[0]
    save_head(model, tmp_path / "head", {"classes": ["aeroplane", "bird"]})
    loaded, info = load_head(tmp_path / "head", bundle.visual)
    assert info["classes"] == ["aeroplane", "bird"] and info["config"]["prompts"] == CFG.prompts
    pixels, text = torch.randn(1, 3, 64, 96), _text(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(bundle.visual, pixels, text), model(bundle.visual, pixels, text))
    assert sum(p.stat().st_size for p in (tmp_path / "head").iterdir()) < 5_000_000  # no backbone inside


def test_checkpoint_for_another_backbone_is_refused(trained, tmp_path):

    save_head(trained[0], tmp_path / "head", {})
    wider = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 96}}
    with pytest.raises(ValueError, match="another backbone"):
        load_head(tmp_path / "head", open_clip.CLIP(**wider).visual)


def test_a_predictor_with_a_head_draws_masks_with_it(trained, voc_pair, make_settings):
    settings = make_settings(mask_min_area=0.0)
    bundle = load_clip(settings)
    predictor = Predictor(settings, bundle, head=trained[0])
    sample = voc_pair[0][0]  # the aeroplane
    buffer = io.BytesIO()
    sample.image.save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    brush = BrushControl("mask", "image", (ClassLabel("aeroplane", ("aeroplane",)),))
    job = PredictJob("v", "image", (), (ImageTask(1, url),), (brush,))
    (result,) = predictor.predict(job).tasks
    (mask,) = result.masks
    predicted = decode_rle(mask.rle).reshape(result.image_height, result.image_width, 4)[:, :, 3] > 0
    truth = sample.mask == 1
    iou = (predicted & truth).sum() / (predicted | truth).sum()
    assert iou > 0.3  # the trained head, not the training-free one, drew this mask

    (untrained,) = Predictor(settings, bundle).predict(job).tasks
    assert [m.rle for m in untrained.masks] != [mask.rle]
    assert Image.open(buffer).size == (result.image_width, result.image_height)


def test_training_command_writes_a_loadable_checkpoint(tiny_checkpoint, tmp_path, bundle):
    out = tmp_path / "head"
    env = {**os.environ, "MODEL_CHECKPOINT": str(tiny_checkpoint)}
    command = [sys.executable, "-m", "worker.training.zegclip", str(shared_data() / "voc-samples"), str(out),
               "--steps", "3", "--batch-size", "2", "--size", "64"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model, info = load_head(out, bundle.visual)
    assert info["steps"] == 3 and "aeroplane" in info["classes"] and 0 <= info["train_miou"] <= 1
    assert "saved" in done.stderr and "train mIoU" in done.stderr


def test_threshold_calibration_picks_the_best_floor_on_the_corrections(trained, bundle, voc_pair):
    model = trained[0]
    original = model.cfg

    def iou_at(threshold: float) -> float:
        model.cfg = dataclasses.replace(original, mask_threshold=threshold)
        return mean_iou(bundle, model, *voc_pair, 64)

    try:
        scores = {t: iou_at(t) for t in THRESHOLDS}
        chosen = calibrate_threshold(bundle, model, *voc_pair, 64)
        assert model.cfg.mask_threshold == chosen
        assert scores[chosen] == max(scores.values()) >= scores[0.5]
    finally:
        model.cfg = original


def test_the_head_trains_in_passes_over_the_masks_it_has_not_a_fixed_count():
    assert schedule(50, epochs=30, max_steps=2000) == 188  # ceil(30 * 50 / 8)
    assert schedule(400, epochs=30, max_steps=2000) == 1500 == 8 * schedule(50, 30, 2000) - 4
    assert schedule(10_000, epochs=30, max_steps=2000) == 2000
    assert schedule(1, epochs=0.1, max_steps=2000) == 1


def test_only_masks_that_paint_a_label_count_towards_the_head():
    """The service's ZEGCLIP_MIN_MASKS floor and the benchmark's section 4 count the same masks:
    one pixel of a label is enough; "no label" (0) and "unknown" (255) alone are not."""
    mask = np.zeros((8, 8), dtype=np.uint8)
    assert not has_label(mask)
    assert not has_label(np.full((8, 8), 255, dtype=np.uint8))
    mask[3, 4] = 255
    assert not has_label(mask)
    mask[0, 0] = 2
    assert has_label(mask)


def test_the_floor_is_set_on_masks_kept_out_of_training(bundle, voc_pair):
    samples = [TrainingSample(voc_pair[0][0].image, voc_pair[0][0].mask, (str(i),)) for i in range(12)]
    train, aside = calibration_split(samples, 0.2)
    assert len(aside) == 2 and len(train) == 10  # every fifth
    assert {id(s) for s in train}.isdisjoint(id(s) for s in aside) and len({id(s) for s in train + aside}) == 12
    assert calibration_split(samples[:1], 0.2) == (samples[:1], [])
    model = ZegCLIP(bundle.visual, ZegCLIPConfig(decoder_heads=4, mask_threshold=0.3))
    assert calibrate_threshold(bundle, model, [], ["aeroplane"], 64) == 0.3  # nothing aside: the floor stays
