"""CLIPSelf on a tiny model and real VOC corrections."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.conftest import shared_data
from worker.model.text import TextEmbedder
from worker.training.clipself import CLIPSelfConfig, grid_cells, train_clipself, trainable_blocks
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


def test_grid_cells_follow_clipself_splits():
    rng = random.Random(0)
    for _ in range(50):
        cells = grid_cells(rng, 10)
        assert 1 <= len(cells) <= 10
        for x0, y0, x1, y1 in cells:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
