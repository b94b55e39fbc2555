"""The toy world's answers must be exactly what it drew; the committed toy CLIP must load
through the service and still score what it scored when it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest

from bench.toy_clip import zero_shot_accuracy
from bench.toyworld import BACKGROUNDS, COLOURS, MIN_VISIBLE, SHAPES, caption, render_scene, scenes
from common.settings import Settings
from worker.loading import load_clip
from worker.model.text import TEMPLATES

TOY_CLIP = Path(__file__).resolve().parents[1] / "bench" / "models" / "toy-clip"


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = scenes(3, 5), scenes(3, 5), scenes(4, 5)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.object_map, y.object_map) and x.objects == y.objects
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(z.image)) for x, z in zip(a, c, strict=True))


def test_masks_and_tags_agree_with_the_drawing():
    for scene in scenes(7, 60, size=96):
        ids = set(np.unique(scene.object_map).tolist()) - {0}
        assert ids == set(range(1, len(scene.objects) + 1))  # every listed object is visible, no other
        assert scene.background in BACKGROUNDS
        pixels = np.asarray(scene.image).astype(int)
        for k, obj in enumerate(scene.objects, start=1):
            region = scene.object_map == k
            assert region.sum() >= MIN_VISIBLE
            mean = pixels[region].mean(axis=0)
            assert np.abs(mean - COLOURS[obj.colour]).max() < 45, (obj, mean)  # painted in its colour
        shape_map, colour_map = scene.class_map("shape"), scene.class_map("colour")
        for k, obj in enumerate(scene.objects, start=1):
            region = scene.object_map == k
            assert (shape_map[region] == 1 + SHAPES.index(obj.shape)).all()
            assert (colour_map[region] == 1 + list(COLOURS).index(obj.colour)).all()
        assert (shape_map[scene.object_map == 0] == 0).all()
        assert scene.shapes == {o.shape for o in scene.objects}


def test_first_object_is_the_large_one():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = render_scene(rng, 96)
        if len(scene.objects) > 1 and scene.objects[0] != scene.objects[1]:
            areas = [(scene.object_map == k).sum() for k in range(1, len(scene.objects) + 1)]
            assert areas[0] >= max(areas[1:]) * 0.5  # large even when partly covered


def test_captions_fit_the_context_and_name_the_main_object():
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=77)
    rng = np.random.default_rng(1)
    for scene in scenes(9, 50):
        text = caption(scene, rng)
        assert (tokenizer([text])[0] != 0).sum() <= 16
        if scene.objects:
            assert scene.objects[0].shape in text
    longest = max(TEMPLATES, key=len).format("purple crescent")
    assert (tokenizer([longest])[0] != 0).sum() <= 16


def test_committed_toy_clip_loads_through_the_service_and_keeps_its_scores():
    if not (TOY_CLIP / "training.json").is_file():
        pytest.fail(f"{TOY_CLIP} is missing: it is committed; regenerate with `python -m bench.toy_clip`.")
    recorded = json.loads((TOY_CLIP / "training.json").read_text())["zero_shot"]
    bundle = load_clip(Settings(model_checkpoint=str(TOY_CLIP), device="cpu"))
    measured = zero_shot_accuracy(bundle.model, bundle.tokenizer)
    assert measured["colour"] == pytest.approx(recorded["colour"], abs=0.01)
    assert measured["shape"] == pytest.approx(recorded["shape"], abs=0.01)
    assert recorded["colour"] > 0.5  # it learned colours (chance is 1/8)
    assert sum(f.stat().st_size for f in TOY_CLIP.iterdir()) < 12_000_000
