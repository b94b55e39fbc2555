"""The few-shot learner: Tip-Adapter's cache, the fitted thresholds, versions that carry them,
and the job that publishes them through the promotion gate."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import redis
import torch
import torch.nn.functional as F
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from common.jobs import ADAPT_QUEUE, AllowListedJob, ChoicesControl, ClassLabel
from common.labelstudio.brush import rle_to_mask
from common.quality import mask_iou
from common.versions import Registry
from tests.test_training import JOB, LABELS, UID, _annotation, _corrections, _project
from worker.checkpoints import ADAPTER_CONFIG, read_version, write_version
from worker.loading import load_clip
from worker.model.adapter import FewShot, RegionPrototypes, TipAdapter
from worker.predictor import Predictor
from worker.provider import ModelProvider
from worker.training import adapt
from worker.training.adapt import (
    NO_LABEL,
    UNKNOWN,
    RegionSample,
    best_thresholds,
    cache_margin,
    cache_wins,
    fit,
    fit_adapter,
    fit_prototypes,
    leave_one_out,
    patch_targets,
    presence,
    project_labels,
    run_adaptation,
)
from worker.training.corrections import Correction
from worker.training.loop import TrainingCancelled


def test_cache_scores_are_tip_adapters_affinities_normalised():
    """Written from the paper's definition: A = exp(-beta (1 - f K^T)), the cache's answer A Y,
    here divided by the sum of the affinities so that it is a probability."""
    torch.manual_seed(0)
    keys = F.normalize(torch.randn(6, 16), dim=-1)
    values = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1]], dtype=torch.float32)
    adapter = TipAdapter(keys, values, ("cat", "dog"), alpha=0.4, beta=5.5)
    f = F.normalize(torch.randn(3, 16), dim=-1)
    expected = torch.zeros(3, 2)
    for b in range(3):
        weights = [float(np.exp(-5.5 * (1 - float(f[b] @ keys[i])))) for i in range(6)]
        for c in range(2):
            expected[b, c] = sum(w * float(values[i, c]) for i, w in enumerate(weights)) / sum(weights)
    assert torch.allclose(adapter.cache_scores(f), expected, atol=1e-5)
    zero_shot = torch.rand(3, 2)
    assert torch.allclose(adapter.blend(zero_shot, f), 0.6 * zero_shot + 0.4 * expected, atol=1e-5)
    adjusted = adapter.adjust({"cat": 0.5, "bird": 0.9}, f[0])
    assert adjusted["bird"] == 0.9  # not the adapter's label: unchanged
    assert adjusted["cat"] == pytest.approx(0.6 * 0.5 + 0.4 * float(expected[0, 0]), abs=1e-5)


def test_an_image_identical_to_a_corrected_one_gets_its_labels_from_a_sharp_cache():
    keys = torch.eye(3)
    adapter = TipAdapter(keys, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), ("a", "b"), 1.0, 50.0)
    assert torch.allclose(adapter.cache_scores(keys), adapter.values, atol=1e-6)


def test_leave_one_out_never_reads_a_task_s_own_labels():
    embeddings = torch.eye(4)  # every task alike only to itself
    truth = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    blended = leave_one_out(torch.zeros(4, 1), embeddings, truth, alpha=1.0, beta=10.0)
    # the others' labels, equally weighted: a task with the label sees 1 of 3 others with it
    assert torch.allclose(blended, torch.tensor([[1 / 3], [2 / 3], [1 / 3], [2 / 3]]))


def best_threshold(scores: np.ndarray, truth: np.ndarray, default: float) -> float:
    """One label's threshold."""
    return float(best_thresholds(scores[:, None], truth[:, None], default)[0])


def test_threshold_separates_the_corrected_tasks_and_keeps_the_default_without_evidence():
    scores = np.array([0.02, 0.05, 0.08, 0.12, 0.15, 0.2])
    truth = np.array([False, False, False, True, True, True])
    cut = best_threshold(scores, truth, default=0.3)
    assert 0.08 < cut <= 0.12
    assert best_threshold(scores, np.zeros(6, dtype=bool), 0.3) == 0.3  # never present, never over the default
    assert 0.2 < best_threshold(scores, np.zeros(6, dtype=bool), 0.1) < 0.2001  # never present, but tagged
    assert 0.0199 < best_threshold(scores, np.ones(6, dtype=bool), 0.3) < 0.02  # always present: all of them
    assert best_threshold(np.array([0.1, np.nan, 0.2]), np.array([False, True, True]), 0.3) == 0.3  # broken scores


def test_a_threshold_leaves_a_lone_outlier_wrong_rather_than_squeeze_beside_it():
    # four tasks without the label crowd just under one that holds it; the others score far above.
    # Counting errors alone puts the cut between 0.0125 and 0.013, where the next task without the
    # label falls on the wrong side; the cut belongs in the wide gap.
    scores = np.array([0.01, 0.011, 0.012, 0.0125, 0.013, 0.2, 0.3, 0.4])
    truth = np.array([False] * 4 + [True] * 4)
    assert 0.03 < best_threshold(scores, truth, default=0.15) < 0.2


def test_a_threshold_makes_at_most_one_error_more_than_the_fewest_however_many_tasks():
    # a rare label among hundreds of tasks: a smoothed count alone would let the many tasks without
    # it push the cut over most of the few that hold it
    for seed, (n, share) in enumerate([(20, 0.3), (100, 0.1), (400, 0.05), (500, 0.02)]):
        rng = np.random.default_rng(seed)
        truth = rng.random(n) < share
        truth[0] = True
        scores = 1 / (1 + np.exp(-np.where(truth, rng.normal(-1, 0.7, n), rng.normal(-3, 0.7, n))))
        fewest = min(((scores >= cut) != truth).sum() for cut in [*scores, np.inf])
        assert ((scores >= best_threshold(scores, truth, 0.3)) != truth).sum() <= fewest + 1


def test_labels_fitted_together_get_the_thresholds_each_gets_alone(monkeypatch):
    rng = np.random.default_rng(0)
    truth = rng.random((60, 9)) < 0.3
    truth[:, 0], truth[:, 1] = True, False  # always and never present
    scores = 1 / (1 + np.exp(-np.where(truth, rng.normal(-1, 1, truth.shape), rng.normal(-3, 1, truth.shape))))
    scores[:, 2] = np.round(scores[:, 2], 1)  # ties
    scores[5, 3] = np.nan  # a broken score
    alone = [best_threshold(scores[:, i], truth[:, i], 0.15) for i in range(9)]
    assert best_thresholds(scores, truth, 0.15).tolist() == alone
    monkeypatch.setattr(adapt, "CELLS", 1)  # one label per block
    assert best_thresholds(scores, truth, 0.15).tolist() == alone
    assert alone[3] == 0.15 and len(set(alone)) > 5


def test_fitting_stops_between_blends_when_asked():
    asked = []
    generator = torch.Generator().manual_seed(0)
    scores, embeddings = torch.rand(20, 3, generator=generator), F.normalize(torch.randn(20, 8, generator=generator))
    with pytest.raises(TrainingCancelled, match="fitting the few-shot blend"):
        fit(scores, embeddings, np.eye(20, 3, dtype=bool), ["a", "b", "c"], 0.3,
            should_stop=lambda: asked.append(1) or len(asked) > 2)  # fmt: skip
    assert len(asked) == 3


def test_a_cache_is_kept_only_when_it_gets_more_tag_sets_right_out_of_fold():
    # scores that say a little, embeddings that say nothing: judged on the tasks its thresholds
    # were fitted on, a cache wins by chance on about a quarter of such projects; out of fold by
    # the margin alone, one of the fifteen blends still won on 6 of these 60
    kept = 0
    for seed in range(60):
        rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        n = int(rng.integers(10, 41))
        truth = rng.random((n, 3)) < 0.4
        scores = torch.from_numpy(np.where(truth, 0.2, 0.1) + rng.normal(0, 0.08, truth.shape)).float()
        embeddings = F.normalize(torch.randn(n, 16, generator=generator), dim=-1)
        fitted = fit(scores.clamp(0.001, 0.999), embeddings, truth, ["a", "b", "c"], default=0.15)
        kept += fitted.few_shot.adapter is not None
    assert kept == 0


def _outcomes(both: int, wins: int, losses: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Which tasks a cache and thresholds alone get right, from the four counts."""
    cache = np.array([True] * both + [True] * wins + [False] * losses + [False] * neither)
    plain = np.array([True] * both + [False] * wins + [True] * losses + [False] * neither)
    return cache, plain


def test_a_cache_must_win_by_the_margin_and_beyond_chance():
    assert not cache_wins(*_outcomes(5, 2, 0, 3))  # under the margin (3)
    assert not cache_wins(*_outcomes(0, 8, 5, 0))  # 3 more right, but 8 of 13 is chance (p = 0.29)
    assert cache_wins(*_outcomes(3, 7, 0, 0))  # 7 of 7: p = 0.008
    assert not cache_wins(*_outcomes(3, 6, 0, 1))  # 6 of 6: p = 0.016
    assert cache_margin(400) == 20
    assert not cache_wins(*_outcomes(300, 19, 0, 81))  # significant, but under 5 % of 400
    assert cache_wins(*_outcomes(300, 60, 30, 10))  # p = 0.001
    assert not cache_wins(*_outcomes(250, 80, 60, 10))  # 20 more right, p = 0.054
    assert cache_wins(*_outcomes(0, 700, 400, 0))  # over a thousand tasks where they differ
    assert not cache_wins(*_outcomes(0, 550, 500, 100))  # 50 more right of 1,150: under the margin (58)


def test_fit_recalibrates_scores_that_miss_the_default_threshold():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 3)) < 0.4
    scores = torch.from_numpy(np.where(truth, 0.15, 0.03) + rng.normal(0, 0.01, truth.shape)).float()
    embeddings = F.normalize(torch.randn(40, 8), dim=-1)  # uninformative: the cache cannot help
    fitted = fit(scores, embeddings, truth, ["a", "b", "c"], default=0.3)
    assert fitted.exact == 1.0 and fitted.few_shot.adapter is None
    assert all(0.03 < t < 0.15 for t in fitted.few_shot.thresholds.values())


def test_fit_uses_the_cache_when_similar_images_share_labels_and_scores_say_nothing():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(2, 32), dim=-1)
    group = torch.arange(40) % 2
    embeddings = F.normalize(centres[group] + 0.05 * torch.randn(40, 32), dim=-1)
    truth = np.stack([group.numpy() == 0, group.numpy() == 1], axis=1)
    scores = torch.rand(40, 2) * 0.1  # zero-shot scores carry nothing
    fitted = fit(scores, embeddings, truth, ["day", "night"], default=0.3)
    assert fitted.few_shot.adapter is not None and fitted.few_shot.adapter.alpha > 0
    assert fitted.exact >= 0.95


def test_presence_reads_tags_masks_and_boxes():
    c = _corrections(None, UID, "image", JOB.choices, JOB.brushes)[0]
    c = dataclasses.replace(c, tags={"tags": {"bird"}}, boxes=[("bottle", (0.1, 0.1, 0.2, 0.2))])
    c.mask = np.zeros((4, 4), dtype=np.uint8)
    c.mask[0, 0] = 1  # aeroplane, painted
    assert presence([c], ["aeroplane", "bird", "bicycle", "bottle"]).tolist() == [[True, True, False, True]]


# Region prototypes: masks from corrected regions.


def test_region_prototypes_blend_a_label_s_text_with_its_prototype():
    torch.manual_seed(0)
    text, prototypes = torch.randn(3, 8), F.normalize(torch.randn(2, 8), dim=-1)
    regions = RegionPrototypes(("cat", "dog"), prototypes, None, 0.25, ("cat", "dog"), "clearclip")
    out = regions.blend(["dog", "bird", "cat"], text)
    t = F.normalize(text, dim=-1)
    assert torch.allclose(out[0], F.normalize(0.75 * t[0] + 0.25 * prototypes[1], dim=0), atol=1e-6)
    assert torch.allclose(out[1], t[1], atol=1e-6)  # no prototype: its text alone
    assert torch.allclose(out[2], F.normalize(0.75 * t[2] + 0.25 * prototypes[0], dim=0), atol=1e-6)
    assert regions.competitors(torch.device("cpu")).shape == (0, 8)
    background = F.normalize(torch.randn(8), dim=0)
    with_none = dataclasses.replace(regions, background=background)
    assert torch.equal(with_none.competitors(torch.device("cpu")), background[None])


def test_patch_targets_read_the_corrected_label_at_each_patch_centre():
    mask = np.zeros((4, 8), dtype=np.uint8)
    mask[:, 2:4], mask[:, 4:6], mask[:, 6:] = 1, 2, 255  # "a", a label not fitted, unknown
    targets = patch_targets(Correction(1, None, mask=mask, mask_labels=("a", "zzz")), ["b", "a"], (2, 4))
    assert targets.tolist() == [NO_LABEL, 1, UNKNOWN, UNKNOWN] * 2


def _clustered(count: int, seed: int) -> list[RegionSample]:
    """Patches whose features tell "a" (axis 0), "b" (axis 1) and no label (axis 2) apart, in
    images holding one or both labels; the text rows (axes 3, 4) see none of it."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        target = torch.full((16,), NO_LABEL)
        target[:5] = 0
        if i % 2:
            target[5:9] = 1
        target[15] = UNKNOWN
        axis = torch.where(target >= 0, target, 2)
        features = F.one_hot(axis, 8).float() + 0.2 * torch.randn(16, 8, generator=generator)
        samples.append(RegionSample(F.normalize(features, dim=-1), target))
    return samples


def test_prototypes_draw_the_masks_text_cannot_and_are_fitted_left_out():
    text, background = torch.eye(8)[[3, 4]], torch.eye(8)[[5]]
    prototypes, scores = fit_prototypes(_clustered(10, 0), text, background, ["a", "b"], "clearclip")
    assert prototypes is not None and prototypes.gamma == 1.0  # the prototype alone
    assert scores[prototypes.gamma] > 0.9 > scores[0.0] + 0.3
    assert prototypes.labels == ("a", "b")
    assert prototypes.prototypes.argmax(dim=1).tolist() == [0, 1] and int(prototypes.background.argmax()) == 2


def test_left_out_masks_are_judged_per_image_so_a_small_region_counts_as_much_as_a_large_one():
    # text alone draws "a" exactly where it covers half an image, and misses it where it is one
    # patch that looks like the background: IoU 1 and 0, so 0.5 (summed over images: 8/9)
    text, background = torch.eye(8)[[0]], torch.eye(8)[[5]]
    large = torch.full((16,), NO_LABEL)
    large[:8] = 0
    small = torch.full((16,), NO_LABEL)
    small[0] = 0
    samples = [RegionSample(torch.eye(8)[torch.where(large == 0, 0, 5)], large),
               RegionSample(torch.eye(8)[[5] * 16], small)]  # fmt: skip
    _, scores = fit_prototypes(samples, text, background, ["a"], "clearclip")
    assert scores[0.0] == pytest.approx(0.5)
    assert set(scores) == set(adapt.GAMMAS) == {0.0, 1.0}  # text alone, or the prototype alone


def test_prototypes_serve_only_the_features_and_labels_they_were_fitted_on():
    regions = RegionPrototypes(("cat",), torch.eye(4)[:1], None, 0.5, ("cat", "dog"), "clearclip+sliding")
    assert regions.serves("clearclip+sliding", ["cat", "dog"]) and regions.serves("clearclip+sliding", ["dog"])
    assert not regions.serves("naclip+sliding", ["cat"])  # another head: another feature space
    assert not regions.serves("clearclip", ["cat"])  # the whole image on the trunk: other features
    assert not regions.serves("clearclip+sliding", ["cat", "bird"])  # "bird" came later: its pixels were left


def test_a_task_tagged_with_a_label_it_has_no_region_of_says_nothing_of_its_pixels():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2] = 1  # "a" painted; "b" tagged, never painted
    tagged = Correction(1, None, {"tags": {"a", "b"}}, mask=mask, mask_labels=("a", "b"))
    assert set(patch_targets(tagged, ["a", "b"], (2, 2)).tolist()) == {0, UNKNOWN}
    painted = Correction(1, None, {"tags": {"a"}}, mask=mask, mask_labels=("a", "b"))
    assert set(patch_targets(painted, ["a", "b"], (2, 2)).tolist()) == {0, NO_LABEL}
    many = Correction(1, None, mask=mask, mask_labels=tuple(f"l{i}" for i in range(600)))  # more than a mask holds
    assert set(patch_targets(many, ["l0"], (2, 2)).tolist()) == {0, NO_LABEL}


def test_a_single_corrected_image_cannot_vouch_for_its_own_regions():
    text, background = torch.eye(8)[[3, 4]], torch.eye(8)[[5]]
    prototypes, scores = fit_prototypes(_clustered(1, 0), text, background, ["a", "b"], "clearclip")
    assert prototypes is None  # left out, it has no other image: every weight draws what text draws
    assert len(set(scores.values())) == 1


# Versions, the predictor and the job.


@pytest.fixture
def adapter_setup(make_settings, redis_url):
    settings = make_settings(redis_url=redis_url, adapt_min_corrections=4, promotion_margin=1.0, mask_min_area=0.0)
    base = Predictor(settings, load_clip(settings))
    registry = Registry(settings.model_dir, settings.model_version, redis.Redis.from_url(redis_url))
    return settings, base, registry


def test_thresholds_and_the_adapter_change_what_the_predictor_tags(adapter_setup, photos):
    settings, base, _ = adapter_setup
    labels = tuple(ClassLabel(n, (n,)) for n in ("cat", "dog"))
    control = ChoicesControl("tags", "image", labels, True)
    images = [base.prepare_image(_decode(photos[name]), _decode(photos[name]).size) for name in sorted(photos)[:3]]

    def tags(predictor: Predictor) -> list[tuple[str, ...]]:
        results, _ = predictor.run([1, 2, 3], images, [control], [])
        return [r.choices[0].selected for r in results]

    assert tags(base.with_few_shot(FewShot({"cat": 0.0, "dog": 2.0}))) == [("cat",)] * 3
    assert tags(base.with_few_shot(FewShot({"cat": 2.0, "dog": 0.0}))) == [("dog",)] * 3
    # a cache whose every image holds "dog", at full weight: "dog" scores 1 on any image
    _, embeddings = base.label_scores(images, labels)
    always_dog = TipAdapter(embeddings, torch.tensor([[0.0, 1.0]] * 3), ("cat", "dog"), 1.0, 5.5)
    assert tags(base.with_few_shot(FewShot({"cat": 0.5, "dog": 0.5}, always_dog))) == [("dog",)] * 3
    # fitted on TagCLIP's scores, they do not cut the global route's (a project that switched TAG_SCORES)
    fitted = FewShot({"cat": 2.0, "dog": 0.0}, always_dog, tag_scores="tagclip")
    switched = base.with_few_shot(fitted).for_project({"TAG_SCORES": "global"})
    assert switched.rule.per_label == {} and switched.tag_fit.adapter is None
    assert switched.for_project({"TAG_SCORES": "tagclip"}).rule.per_label == {"cat": 2.0, "dog": 0.0}


def test_a_version_carries_its_adapter_and_thresholds(adapter_setup, tmp_path):
    settings, base, registry = adapter_setup
    adapter = TipAdapter(F.normalize(torch.randn(5, base.bundle.visual.output_dim), dim=-1), torch.ones(5, 2),
                         ("cat", "dog"), 0.5, 3.0)  # fmt: skip
    dim = base.bundle.visual.output_dim
    regions = RegionPrototypes(("dog",), F.normalize(torch.randn(1, dim), dim=-1), F.normalize(torch.randn(dim), dim=0),
                               0.75, ("cat", "dog"), "clearclip+sliding")  # fmt: skip
    info = registry.add(UID, lambda d: write_version(d, {}, None, {}, FewShot({"cat": 0.12}, adapter, regions)))
    loaded = read_version(registry, UID, info.version, base.bundle.visual).few_shot
    assert loaded.thresholds == {"cat": 0.12} and loaded.tag_scores == "tagclip"
    assert loaded.adapter is not None and loaded.adapter.labels == ("cat", "dog") and loaded.adapter.beta == 3.0
    assert torch.equal(loaded.adapter.keys, adapter.keys)
    assert loaded.prototypes is not None and loaded.prototypes.labels == ("dog",) and loaded.prototypes.gamma == 0.75
    assert loaded.prototypes.painted == ("cat", "dog") and loaded.prototypes.features == "clearclip+sliding"
    assert torch.equal(loaded.prototypes.prototypes, regions.prototypes)
    assert torch.equal(loaded.prototypes.background, regions.background)
    regions_file = registry.version_dir(UID, info.number) / "regions.safetensors"
    assert regions_file.is_file()
    only_tags = registry.add(UID, lambda d: write_version(d, {}, None, {}, FewShot({}, adapter)))
    assert read_version(registry, UID, only_tags.version, base.bundle.visual).few_shot.prototypes is None
    on_global = registry.add(UID, lambda d: write_version(d, {}, None, {}, FewShot({"cat": 0.3}, tag_scores="global")))
    assert read_version(registry, UID, on_global.version, base.bundle.visual).few_shot.tag_scores == "global"
    config = registry.version_dir(UID, info.number) / ADAPTER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), "thresholds": {"cat": 0.9}}))
    with pytest.raises(Exception, match="checksum|changed|differ"):  # the registry's checksums cover it
        read_version(registry, UID, info.version, base.bundle.visual)


def _colour_uri(rgb: tuple[int, int, int]) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _colour_corrections(settings, project, image_key, choices, brushes, regions=(), limit=None) -> list[Correction]:
    """Red photos are tagged "bird", blue ones "bottle": the random tiny model's scores mean
    nothing, but equal images score equally, so the few-shot learner can learn the project."""
    red, blue = _colour_uri((200, 30, 30)), _colour_uri((30, 30, 200))
    return [Correction(200 + i, red if i % 2 else blue, {"tags": {"bird" if i % 2 else "bottle"}}) for i in range(24)]


def test_the_job_fits_saves_and_promotes_through_the_gate_and_workers_serve_it(adapter_setup):
    settings, base, registry = adapter_setup
    job = dataclasses.replace(JOB, model_version=settings.model_version, brushes=())
    stages = []
    summary = run_adaptation(base, registry, job, lambda stage, *a: stages.append(stage), lambda: False,
                             collect=_colour_corrections)  # fmt: skip
    assert summary["status"] == "promoted", summary
    assert stages == ["collecting corrections", "fitting", "evaluating"]
    metrics = summary["metrics"]
    assert metrics["candidate"]["tag_exact"] == 1.0 > metrics["active"]["tag_exact"]  # the base tags most labels
    (info,) = registry.versions(UID)
    assert info.config["learner"] == "few-shot"
    assert set(info.config["thresholds"]) == {"aeroplane", "bird", "bicycle", "bottle"}
    assert registry.active(UID) == info.version
    # a worker loads the version with its thresholds and cache, on the base's own ViT, and predicts with them
    provider = ModelProvider(settings)
    provider._predictor = base
    served = provider.for_version(info.version, UID)
    assert served.rule.per_label == info.config["thresholds"]
    assert served.bundle.visual is base.bundle.visual  # few-shot only: no copy of the ViT
    # fitted again on the same corrections, the candidate is only as good: no promotion, no re-predicting
    again = run_adaptation(served, registry, dataclasses.replace(job, model_version=info.version), lambda *a: None,
                           lambda: False, collect=_colour_corrections)  # fmt: skip
    assert again["status"] == "rejected" and "no better" in again["reason"]
    assert registry.active(UID) == info.version


def _half_uri(red_left: bool) -> str:
    import base64
    import io

    from PIL import Image

    image = Image.new("RGB", (64, 48), (30, 30, 200))
    image.paste((200, 30, 30), (0 if red_left else 32, 0, 32 if red_left else 64, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _half_corrections(settings, project, image_key, choices, brushes, regions=(), limit=None) -> list[Correction]:
    """Images half red, half blue; annotators paint the red half "bird" and leave the blue one."""
    out = []
    for i in range(20):
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[:, slice(0, 32) if i % 2 else slice(32, 64)] = 2  # "bird" is the mask's second label
        out.append(Correction(300 + i, _half_uri(bool(i % 2)), {"tags": {"bird"}}, mask, LABELS))
    return out


def test_a_project_s_fit_stops_after_scoring_between_blends_and_before_the_prototypes(adapter_setup):
    settings, base, registry = adapter_setup
    corrections = [dataclasses.replace(c, image=_decode_uri(c.image_url))
                   for c in _half_corrections(settings, UID, "image", JOB.choices, JOB.brushes)]  # fmt: skip

    def stop_at(call: int):
        calls = []
        return lambda: calls.append(1) or len(calls) == call

    blends = sum(alpha > 0 for alpha in adapt.ALPHAS) * len(adapt.BETAS)  # one question before each
    for call, where in ((1, "after scoring"), (2, "blend"), (2 + blends, "before the region prototypes")):
        with pytest.raises(TrainingCancelled, match=where):
            fit_adapter(base, corrections, project_labels(JOB), LABELS, stop_at(call))


def test_the_few_shot_learner_learns_a_project_s_masks_from_its_corrected_regions(adapter_setup):
    settings, base, registry = adapter_setup
    labels = project_labels(JOB)
    corrections = [dataclasses.replace(c, image=_decode_uri(c.image_url))
                   for c in _half_corrections(settings, UID, "image", JOB.choices, JOB.brushes)]  # fmt: skip
    fitted = fit_adapter(base, corrections, labels, LABELS)
    assert fitted.few_shot.prototypes is not None and "bird" in fitted.few_shot.prototypes.labels
    assert fitted.region_miou[fitted.few_shot.prototypes.gamma] > fitted.region_miou[0.0]

    new = [_decode_uri(_half_uri(red_left)) for red_left in (True, False)]
    images = [base.prepare_image(image, image.size) for image in new]

    def bird_iou(predictor: Predictor) -> float:
        results, _ = predictor.run([1, 2], images, JOB.choices, JOB.brushes)
        ious = []
        for result, red_left in zip(results, (True, False), strict=True):
            drawn = {m.label: rle_to_mask(m.rle, 64, 48) for m in result.masks}
            truth = np.zeros((48, 64), dtype=bool)
            truth[:, slice(0, 32) if red_left else slice(32, 64)] = True
            ious.append(mask_iou(drawn.get("bird", np.zeros_like(truth)), truth))
        return float(np.mean(ious))

    tags_only = base.with_few_shot(dataclasses.replace(fitted.few_shot, prototypes=None))
    assert bird_iou(base.with_few_shot(fitted.few_shot)) > 0.8 > bird_iou(tags_only) + 0.2

    # DENSE_PAMR=auto (the default) refines the masks the prototypes draw along the image's edges,
    # as true does (training-free masks it leaves as false does: tests/test_app.py)
    def rles(predictor: Predictor) -> list[str]:
        results, _ = predictor.run([1, 2], images, JOB.choices, JOB.brushes)
        return [m.rle for result in results for m in result.masks]

    assert base.settings.dense_pamr == "auto"
    # half text, half prototype: masks with a boundary for PAMR to move (the fitted prototypes alone
    # draw these two-colour images exactly, with or without it)
    blurred = dataclasses.replace(fitted.few_shot.prototypes, gamma=0.5)
    learnt = base.with_few_shot(dataclasses.replace(fitted.few_shot, prototypes=blurred))
    assert rles(learnt) == rles(learnt.for_project({"DENSE_PAMR": "true"}))
    assert rles(learnt) != rles(learnt.for_project({"DENSE_PAMR": "false"}))

    job = dataclasses.replace(JOB, model_version=settings.model_version)
    summary = run_adaptation(base, registry, job, lambda *a: None, lambda: False, collect=_half_corrections)
    assert summary["status"] == "promoted", summary
    assert summary["metrics"]["candidate"]["mask_miou"] > summary["metrics"]["active"]["mask_miou"]
    regions = registry.get(UID, summary["version"]).config["regions"]
    assert regions["gamma"] > 0 and regions["features"] == "clearclip+sliding"
    # a project whose masks are drawn without sliding windows gets prototypes of those features
    own = dataclasses.replace(job, project_settings={"DENSE_SLIDING": False})
    summary = run_adaptation(base, registry, own, lambda *a: None, lambda: False, collect=_half_corrections)
    assert registry.get(UID, summary["version"]).config["regions"]["features"] == "clearclip"


def test_a_learner_never_undoes_a_version_promoted_while_it_ran(adapter_setup):
    settings, base, registry = adapter_setup
    job = dataclasses.replace(JOB, model_version=settings.model_version, brushes=())
    meanwhile = registry.add(UID, lambda d: write_version(d, {}, None, {}),
                             config={"from_version": settings.model_version})  # fmt: skip
    registry.activate(UID, meanwhile.version)  # e.g. a training run finished while this job was queued
    summary = run_adaptation(base, registry, job, lambda *a: None, lambda: False, collect=_colour_corrections)
    assert summary["status"] == "rejected" and "while this one was fitted" in summary["reason"]
    assert registry.active(UID) == meanwhile.version
    assert not registry.get(UID, summary["version"]).promoted  # recorded as a candidate


def test_too_few_corrections_fit_nothing_and_fetch_no_image(adapter_setup):
    settings, base, registry = adapter_setup
    settings = dataclasses.replace(settings, adapt_min_corrections=1000, adapt_max_corrections=1000)
    summary = run_adaptation(Predictor(settings, base.bundle), registry, JOB, lambda *a: None, lambda: False,
                             collect=_corrections)  # fmt: skip
    assert summary["status"] == "skipped" and "starts at 1000" in summary["reason"]
    assert registry.versions(UID) == []


def test_corrections_queue_one_few_shot_job_at_a_time_and_a_worker_runs_it(make_settings, redis_url):
    from backend.app import create_app

    settings = make_settings(redis_url=redis_url, adapt_every=2, train_every=0)
    client = create_app(settings).test_client()
    # the project's own settings travel with its learners' jobs, so they fit what it is served
    setup = {"project": UID, "schema": _project()["label_config"], "extra_params": {"DENSE_HEAD": "naclip"}}
    assert client.post("/setup", json=setup).status_code == 200

    def webhook(annotation_id: int) -> dict:
        body = {"action": "ANNOTATION_CREATED", "project": _project(), "annotation": _annotation(annotation_id, 7)}
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.get_json()
        return response.get_json()

    assert webhook(1)["few_shot_job"] is None  # 1 of ADAPT_EVERY=2
    first = webhook(2)["few_shot_job"]
    assert first is not None
    assert webhook(3)["few_shot_job"] is None and webhook(4)["few_shot_job"] is None  # one is still waiting
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(ADAPT_QUEUE, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
    assert queue.job_ids == [first]
    queued = AllowListedJob.fetch(first, connection=connection, serializer=JSONSerializer)
    assert queued.args[0]["project_settings"] == {"DENSE_HEAD": "naclip"}
    # a worker takes it (here in a process with no model: it fails, and a new one may be queued;
    # test_e2e.py runs the whole loop with Label Studio)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
    worker.work(burst=True)
    job = AllowListedJob.fetch(first, connection=connection, serializer=JSONSerializer)
    assert job.get_status() in ("failed", "finished")
    # corrections 3 and 4 were the waiting job's to read: counting starts again
    assert webhook(5)["few_shot_job"] is None and webhook(6)["few_shot_job"] not in (None, first)


def _decode(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_held_out_tasks_stay_held_out_as_corrections_come_and_go():
    """The gate must never measure a version on tasks the active one learned from: a task's side
    depends on its id alone, not on which other tasks are there."""
    from worker.training.adapt import newest
    from worker.training.corrections import split

    corrections = [Correction(i, None) for i in range(1, 200)]
    first = {c.task_id for c in split(corrections[:100], 0.2).held_out}
    later = {c.task_id for c in split(corrections, 0.2).held_out}
    assert first == later & set(range(1, 101)) and 10 <= len(first) <= 30
    trimmed = newest(corrections, 50)
    assert [c.task_id for c in trimmed] == list(range(150, 200))
    assert {c.task_id for c in split(trimmed, 0.2).held_out} == later & set(range(150, 200))
    assert [c.task_id for c in newest([Correction("b", None), Correction(3, None), Correction("a", None)], 2)] == [
        "a", "b"]  # fmt: skip


def _decode_uri(uri: str):
    import base64

    return _decode(base64.b64decode(uri.split(",", 1)[1]))
