"""The quality instrument: its metrics on known inputs, and a smoke run of the whole benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import quality
from bench.toyworld import scenes
from bench.units import Units
from common import quality as metrics
from common.settings import Settings
from worker.loading import load_clip
from worker.model.selection import TagRule
from worker.model.tagclip import TagCLIPConfig
from worker.model.text import TextEmbedder
from worker.predictor import Predictor
from worker.training import adapt


def test_mean_average_precision_on_known_rankings():
    truth = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=bool)
    perfect = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.2]])
    assert metrics.mean_average_precision(perfect, truth) == 1.0
    swapped = np.array([[0.1, 0.1], [0.9, 0.9], [0.8, 0.3], [0.7, 0.2]])  # class 0: positives ranked 4th and 2nd
    ap0 = (1 / 2 + 2 / 4) / 2
    assert metrics.mean_average_precision(swapped, truth) == pytest.approx((ap0 + 1.0) / 2)


def test_iou_table_and_acceptance_on_known_maps():
    truth = [np.array([[0, 1], [1, 2]])]
    predicted = [np.array([[0, 1], [2, 2]])]
    table = metrics.iou_table(predicted, truth, classes=3)
    assert table[0] == 1.0 and table[1] == 0.5 and table[2] == 0.5 and np.isnan(table[3])
    assert metrics.miou(predicted, truth, 3) == pytest.approx(2 / 3)
    assert quality.accepted_share(truth, truth) == 1.0
    assert quality.accepted_share(predicted, truth) == 0.0


def test_micro_f1():
    truth = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    predicted = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    assert metrics.micro_f1(predicted, truth) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_least_confident_first_ranks_tasks_by_their_tag_confidence():
    rule = TagRule("absolute", min_score=0.2)
    scores = np.array([[0.95, 0.0], [0.21, 0.19], [0.6, 0.05], [0.22, 0.9]])  # mean distances .59, .01, .34, .45
    order = quality.least_confident_first(scores, ("cat", "dog"), rule)
    assert order.tolist() == [1, 2, 3, 0]
    assert quality.least_confident_first(scores[[0, 2]], ("cat", "dog"), rule).tolist() == [1, 0]


def test_benchmark_smoke_run(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(quality, "SERVICE", dataclasses.replace(quality.SERVICE, zegclip_min_masks=1))  # K = 2 trains
    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    bundle = load_clip(settings)
    text = TextEmbedder(bundle)
    bench = quality.Bench(bundle, text, TagCLIPConfig(), batch_size=4)
    predictor = Predictor(settings, bundle, text=text)
    report = quality.run(bench, n_held_out=8, n_pool=8, ks=[2], epochs=2, seeds=2, predictor=predictor,
                         small_ks=((2, 4), (2,)))  # fmt: skip
    assert report["seeds"] == 2 and set(report["tagging"]) == {"colour", "shape"}
    for kind in report["tagging"].values():
        assert set(kind) == set(quality.TAG_METHODS)
        for figures in kind.values():  # mean and spread over the seeds
            assert all(0 <= v <= 1 for v in figures["mAP"]["runs"]) and len(figures["F1"]["runs"]) == 2
    rows = {f"{h}{' sliding' if slide else ''}" for h, slide in quality.SEGMENTATION}
    assert set(report["segmentation"]) == {f"{row}{r}" for row in rows for r in ("", " + tags")}
    assert "naclip sliding" in report["segmentation"]
    small = dict(report["small_sets"])
    assert small.pop("dense_head") == "clearclip" and small.pop("tag_scores") == "tagclip"
    assert small.pop("dense_pamr") == "auto"  # the service's default
    assert set(small) == {f"{k} x{n}" for k in quality.KINDS for n in quality.SMALL_SETS}
    for row in small.values():
        assert {"before", "after 2", "after 4", "least confident 2"} <= set(row)
        assert 0 <= row["before"]["exact"]["mean"] <= 1
    rows = report["learning"]["rows"]
    assert [(r["strategy"], r["k"]) for r in rows] == [("random", 2), ("least confident", 2)]
    assert rows[0]["clipself_steps"] == math.ceil(2 * 2 / quality.CLIPSELF_BATCH)  # 2 passes over K = 2
    for r in rows:  # a head trained on the scenes' masks, every seed (a count all seeds share is one number)
        steps = r["zegclip_steps"]
        assert (min(steps["runs"]) if isinstance(steps, dict) else steps) > 0
    (gain,) = report["learning"]["gains"]  # least confident - random, paired seed by seed
    for metric in quality.LEARNING_GAIN_METRICS:
        chance, unsure = rows[0][metric]["runs"], rows[1][metric]["runs"]
        paired = [u - c for c, u in zip(chance, unsure, strict=True)]
        assert gain[metric]["runs"] == pytest.approx(paired)
    text = quality.markdown(report, "python -m bench.quality --smoke", bundle.description)
    assert "## 1. Tagging" in text and "| dmar+cwr |" in text and "least confident" in text
    assert "## 3. Small label sets" in text and "| colour x3 |" in text and "exact after 4" in text
    learning_gains = text.split("Least confident first - random")[1].splitlines()
    expected = f"| 2 | {quality.cell(gain['tag_map_after'])} | {quality.cell(gain['miou_after'])} | "
    assert any(line.startswith(expected) for line in learning_gains)
    active = text.split("### 3d.")[1].split("## 4.")[0]  # random and least confident side by side, per K
    rows = [line.split(" | ") for line in active.splitlines() if line.startswith("| colour x3 | ")]
    assert [row[1] for row in rows] == ["2"]
    unsure = small["colour x3"]["least confident 2"]
    assert rows[0][3] == quality.cell(unsure["exact"], True) and rows[0][6] == quality.cell(unsure["mask_iou"])
    per_label = report["per_label_ap"]
    assert {kind: list(labels) for kind, labels in per_label.items()} == {k: list(v) for k, v in quality.KINDS.items()}
    table = text.split("### 1b. Per label (dmar+cwr AP)")[1].split("## 2.")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "AP" not in line]
    assert len(rows) == max(len(labels) for labels in quality.KINDS.values())
    for kind, column in (("colour", 0), ("shape", 2)):  # each label beside its own AP (n/a where absent)
        expected = [(label, quality.cell(figure)) for label, figure in per_label[kind].items()]
        expected += [("", "")] * (len(rows) - len(expected))
        assert [(row[column].strip(), row[column + 1].strip()) for row in rows] == expected


def test_the_benchmark_scores_acceptance_with_the_services_definition():
    truth = np.zeros((4, 4), dtype=np.int64)
    truth[:2, :2] = 1
    almost = truth.copy()
    almost[3, 3] = 1  # one pixel more: IoU 0.8, which an annotator would have to fix
    assert quality.accepted_share([truth], [truth]) == 1.0
    assert quality.accepted_share([almost], [truth]) == 0.0
    assert quality.accepted_share([np.zeros_like(truth)], [np.zeros_like(truth)]) == 1.0  # nothing, rightly


def test_throughput_benchmark_smoke_run(tiny_checkpoint, redis_url, tmp_path):
    from bench import throughput

    out, figures = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    throughput.main(["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--size", "64", "--batch", "2",
                     "--repeats", "1", "--tasks", "2", "--train-steps", "2", "--redis", redis_url,
                     "--out", str(out), "--json", str(figures)])  # fmt: skip
    text = out.read_text()
    assert "| prelabel tags + masks |" in text and "| cached |" in text and "CLIPSelf:" in text
    assert "ZegCLIP head:" in text
    report = json.loads(figures.read_text())
    assert report["training"]["steps_per_s"] > 0 and report["training"]["zegclip_steps_per_s"] > 0
    assert report["pipeline"]["tags"] > 0 and report["pipeline"]["one 512 px image s"] > 0
    # Counted work: the pipeline runs the encoder's trunk and more (TagCLIP's block, CWR crops).
    pipeline, encoder = report["pipeline"], report["ceiling"]["working GFLOP"]
    assert pipeline["tags+masks GFLOP"] >= pipeline["tags+masks, 2 crops GFLOP"] > encoder > 0
    assert report["mask_output"]["count"] > 0 and report["mask_output"]["rle"] > 0
    serving = report["serving"]
    assert serving["queue"]["p50"] > 0 and 0 < serving["queue overhead"]["p50"] < serving["queue"]["p50"]


def test_load_test_smoke_run(tiny_checkpoint, redis_url):
    from bench import load

    result = load.run(clients=2, seconds=2, tasks=2, redis_url=redis_url, checkpoint=str(tiny_checkpoint), threads=2)
    assert result["errors"] == 0 and result["requests"] > 0 and result["p50_ms"] > 0


def test_scaling_benchmark_smoke_run(tiny_checkpoint, redis_url):
    from bench import scaling

    row = scaling.run(workers=1, tasks=4, chunk=2, size=64, redis_url=redis_url, checkpoint=str(tiny_checkpoint),
                      delay=0.0)  # fmt: skip
    assert row["served"] == 4 and row["chunks"] == 2
    assert row["opened_task_s"] > 0 and row["selection_s"] > 0


def test_recipe_benchmark_smoke_run(tiny_checkpoint):
    from bench import recipes
    from worker.model import vit

    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    bundle = load_clip(settings)
    bench = quality.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=4)
    figures = recipes.measure(bench, n_scenes=4, seeds=1)
    rows = {row for row, _ in figures}
    assert {"TagCLIP mAP, bilinear", "TagCLIP mAP, bicubic", "naclip sliding + tags, bilinear, floor 0.5"} <= rows
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in figures.values())
    assert vit.POSITION_INTERPOLATION == "bilinear"  # the service's, put back


def test_working_size_benchmark_smoke_run(tiny_checkpoint):
    from bench import working_size

    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    bundle = load_clip(settings)
    bench = quality.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=4)
    figures = working_size.measure(bench, [64, 96], n_scenes=4, seeds=1)
    rows = {row for row, _ in figures}
    assert {"64: maskclip + tags", "96: maskclip sliding + tags", "96: naclip sliding + tags", "96: seconds"} <= rows
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for (row, _), v in figures.items() if not row.endswith("seconds"))


def test_region_weight_study_draws_every_weight_and_reports_the_learner_s_pick(tiny_checkpoint):
    from bench import region_weight

    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", image_size=quality.SIZE,
                        background_words=quality.BACKGROUNDS, dense_head="maskclip", dense_pamr="auto")  # fmt: skip
    bundle = load_clip(settings)
    rows = region_weight.measure(Predictor(settings, bundle), seed=0, n_held_out=6, n_pool=12, ks=(2, 4),
                                 active_ks=(2,))  # fmt: skip
    assert [(r["project"], r["chosen"], r["k"]) for r in rows][:3] == [
        ("colour x1", "random", 2),
        ("colour x1", "random", 4),
        ("colour x1", "least confident", 2),
    ]
    assert {r["project"] for r in rows} == {"colour x1", "colour x2", "colour x3", "colour x5"}
    for row in rows:
        assert set(row["held_out"]) == set(region_weight.WEIGHTS) and row["picked"] in region_weight.WEIGHTS
        assert set(row["left_out"]) == set(adapt.GAMMAS)
        for f in row["held_out"].values():  # no IoU (NaN) where six scenes show none of the labels
            assert (math.isnan(f["mask_iou"]) or 0 <= f["mask_iou"] <= 1) and 0 <= f["accepted"] <= 1
    lines = region_weight.table(rows)
    assert lines[0].startswith("| project | fits | picked | gamma 0.0 |") and lines[-1].startswith("| all | 12 |")


def test_pamr_benchmark_smoke_run(tiny_checkpoint):
    from bench import pamr

    figures = pamr.measure(str(tiny_checkpoint), "maskclip", seed=0, n_held_out=6, n_pool=12, ks=(2,))
    assert set(figures) == {"false", "true"}
    for projects in figures.values():
        assert set(projects) == {"colour x1", "colour x2", "colour x3", "colour x5"}  # no shape project
        for stages in projects.values():
            assert set(stages) == {"before", "after 2"}
            assert all(0 <= f["accepted"] <= 1 and 0 <= f["exact"] <= 1 for f in stages.values())


def test_the_last_block_variants_include_the_heads_they_take_apart(tiny_checkpoint):
    """MaskCLIP's and ClearCLIP's rows of bench/last_block.py are those heads exactly, and the
    heads' own block is back afterwards."""
    import torch

    from bench import last_block
    from worker.model import dense, vit

    bundle = load_clip(Settings(model_checkpoint=str(tiny_checkpoint), device="cpu"))
    visual, pixels = bundle.visual, torch.randn(2, 3, 64, 64)
    tokens, grid = vit.trunk(visual, pixels), (64 // vit.patch_size(visual),) * 2
    for row, head in (("MaskCLIP: x + self-value + FFN", "maskclip"), ("ClearCLIP: q-q attention alone", "clearclip")):
        expected = dense.dense_features(visual, tokens, grid, head)
        with last_block.last_block(last_block.VARIANTS[row]):
            taken_apart = dense.dense_features(visual, tokens, grid, "naclip")  # the variant, whatever the head
        assert torch.allclose(taken_apart, expected, atol=1e-5), row
    with last_block.last_block(last_block.VARIANTS["x alone (the residual stream)"]):
        residual = dense.dense_features(visual, tokens, grid, "maskclip")
    assert not torch.allclose(residual, dense.dense_features(visual, tokens, grid, "maskclip"), atol=1e-3)
    bench = quality.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=4)
    figures = last_block.measure(bench, n_scenes=4, seeds=1)
    assert {row for row, _ in figures} == set(last_block.VARIANTS)
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in figures.values())


def test_secondary_objects_split_each_labels_scenes_by_its_role(tiny_checkpoint):
    """bench/secondary_objects.py: a label is MAIN in a scene when its largest object has it, OTHER
    when only smaller ones do; each role's AP ranks its scenes against the scenes without the label
    only (a scene where the label is the main object is no negative for the other role)."""
    from bench import secondary_objects as so

    held_out = [s for s in scenes(quality.HELD_OUT_SEED, 40, quality.SIZE) if len(s.colours) >= 2]
    role = so.roles(held_out, "colour")
    names = quality.KINDS["colour"]
    for scene, row in zip(held_out, role, strict=True):
        areas = [(scene.object_map == k).sum() for k in range(1, len(scene.objects) + 1)]
        largest = scene.objects[int(np.argmax(areas))].colour
        assert [names[c] for c in np.nonzero(row == so.MAIN)[0]] == [largest]
        assert {names[c] for c in np.nonzero(row == so.OTHER)[0]} == scene.colours - {largest}
    scores = np.array([[0.95], [0.9], [0.5], [0.2]])
    one = np.array([[so.MAIN], [so.OTHER], [so.ABSENT], [so.ABSENT]])
    assert so.role_ap(scores, one, so.OTHER) == 1.0  # the main-object scene above it is left out
    assert so.role_ap(scores, one, so.MAIN) == 1.0
    assert so.role_ap(scores[::-1], one, so.MAIN) == pytest.approx(1 / 3)  # below both scenes without it

    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    bundle = load_clip(settings)
    bench = quality.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=4)
    figures = so.measure(bench, n_scenes=6, seeds=1)
    assert {row for row, _ in figures} == {f"{r}, {n}" for r in so.ROUTES for n in so.ROLES}
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in figures.values())


def test_learning_recipe_benchmark_smoke_run(tiny_checkpoint):
    from bench import learning_recipes as recipes

    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    bundle = load_clip(settings)
    bench = quality.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=4)
    rows = recipes.measure(bench, "colour", k=5, steps=2, lr=1e-4, n_scenes=4, seeds=1, passes=[1])
    assert "CLIPSelf, served + TagCLIP's paths, class token held (service): ClearCLIP mIoU" in rows
    views = {"letterboxed (the paper's)", "square crops", "squashed (prelabel before)"}
    assert {f"CLIPSelf on wide corrections, {view}: TagCLIP mAP" for view in views} <= set(rows)
    assert any(row.startswith("ZegCLIP head with both (prelabel before)") for row in rows)
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in rows.values())


def test_the_departures_rebuild_what_prelabel_did_before():
    """The learning-recipe benchmark measures the papers' recipes against prelabel's earlier ones,
    rebuilt in the benchmark: check each rebuild is what it says, and that the service's are back."""
    import torch

    from bench import learning_recipes as recipes
    from worker.model.zegclip import ZegCLIPConfig, segmentation_loss
    from worker.training import clipself, zegclip

    torch.manual_seed(0)
    logits, mask = torch.randn(3, 4, 8, 8), torch.randint(0, 3, (3, 8, 8))  # class 3 never present
    cfg = ZegCLIPConfig()
    targets = torch.nn.functional.one_hot(mask, 4).permute(0, 3, 1, 2).float()
    p = logits.sigmoid()
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    focal_everywhere = (alpha_t * (1 - p_t) ** 2 * ce).mean()  # over every pixel of every map
    dice = segmentation_loss(logits, mask, ZegCLIPConfig(focal_weight=0.0))
    expected = cfg.focal_weight * focal_everywhere + dice
    assert recipes.focal_over_every_map(logits, mask, cfg) == pytest.approx(float(expected), rel=1e-5)
    assert segmentation_loss(logits, mask, cfg) != pytest.approx(float(expected), rel=1e-3)

    with recipes.focal_over_maps():
        assert zegclip.segmentation_loss is recipes.focal_over_every_map
    assert zegclip.segmentation_loss is segmentation_loss

    from PIL import Image

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    with recipes.clipself_squashed(32):
        pixels, cover = clipself.letterbox(wide, 32, mean, std)
        assert cover == (0.0, 0.0, 1.0, 1.0) and torch.allclose(pixels[0], torch.ones(32, 32))  # red everywhere
        crops = clipself.teacher_crops(wide, [(0.0, 0.0, 1.0, 0.5)], 16, mean, std)  # a 2:1 crop of the square
        assert torch.allclose(crops[0, :, 4:12], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 8, 16))
        assert (crops[0, :, :4] == 0).all() and (crops[0, :, 12:] == 0).all()  # grey (zero) padding
    pixels, cover = clipself.letterbox(wide, 32, mean, std)
    assert cover == (0.0, 0.0, 1.0, 0.5) and (pixels[:, 16:] == -1).all()  # the service's: black below


def test_section_3_tables_put_each_figure_in_its_own_column():
    def figure(value: float) -> dict:
        return {"mean": value, "std": 0.0, "runs": [value]}

    def learnt(exact: float, iou: float, accepted: float, false_tags: float = 0.0) -> dict:
        return {"exact": figure(exact), "mask_iou": figure(iou), "accepted": figure(accepted),
                "false_on_none": figure(false_tags), "recall_several": figure(1.0), "gamma": figure(0.5),
                "mask_iou_tags_only": figure(iou)}  # fmt: skip

    gain = {"exact": figure(0.31), "mask_iou": figure(0.32), "accepted": figure(0.33)}
    late = learnt(0.8, 0.85, 0.9, 0.07)
    del late["mask_iou_tags_only"]  # past TAGS_ALONE_UP_TO: masks with prototypes only
    row = {"before": learnt(0.1, 0.1, 0.15, 0.05), "after 10": learnt(0.2, 0.3, 0.4, 0.06), "after 100": late,
           "least confident 10": {**learnt(0.5, 0.6, 0.7), "gain_over_random": gain},
           "best_min_score": figure(0.15)}  # fmt: skip
    text = "\n".join(quality.small_sets_markdown({"colour x1": row, "dense_head": "maskclip"}))

    def cells(section: str, start: str) -> list[str]:
        line = next(line for line in section.splitlines() if line.startswith(start))
        return [c.strip(" |") for c in line.removeprefix(start).split(" | ")]

    false_tags = text.split("### 3b.")[1].split("with none of the labels")[1].split("accepted unchanged")[0]
    assert cells(false_tags, "| colour x1 | ") == ["5.0%", "6.0%", "7.0%"]
    accepted = text.split("### 3b.")[1].split("accepted unchanged")[1].split("### 3c.")[0]
    assert cells(accepted, "| colour x1 | ") == ["15.0%", "40.0%", "90.0%"]
    assert cells(text.split("### 3c.")[1].split("### 3d.")[0], "| colour x1 | ") == [
        "0.100", "0.300", "0.300", "0.850", "0.500"]  # fmt: skip
    assert cells(text.split("### 3d.")[1], "| colour x1 | 10 | ") == [
        "20.0%", "50.0%", "31.0%", "0.300", "0.600", "0.320", "40.0%", "70.0%", "33.0%"]  # fmt: skip


def test_section_3_corrects_nested_random_scenes_and_the_lowest_scored_tasks(tiny_checkpoint, monkeypatch):
    settings = Settings(model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS)
    predictor = Predictor(settings, load_clip(settings))
    held_out, pool = scenes(1, 3, quality.SIZE), scenes(2, 6, quality.SIZE)
    chosen: dict[tuple, list[list[int]]] = {}
    fit_for_real = quality.after_corrections

    def spy(predictor, corrected, picked, *args, **kwargs):
        chosen.setdefault((corrected.kind, corrected.labels), []).append(picked.tolist())
        return fit_for_real(predictor, corrected, picked, *args, **kwargs)

    monkeypatch.setattr(quality, "after_corrections", spy)
    small = quality.small_label_sets(predictor, held_out, pool, seed=0, ks=(2, 4), active_ks=(2,))
    prepared = list(predictor.prepare([s.image for s in pool]))
    assert len(chosen) == len(quality.KINDS) * len(quality.SMALL_SETS)
    for (kind, labels), (two, four, unsure) in chosen.items():
        assert len(set(four)) == 4 and two == four[:2]  # K random scenes, each K a prefix of the next
        scores = [r.score for r in quality._predict(predictor, prepared, kind, labels, masks=True)]
        assert sorted(scores[i] for i in unsure) == sorted(scores)[:2]  # the two lowest task scores
        row = small[f"{kind} x{len(labels)}"]
        for metric, gain in row["least confident 2"]["gain_over_random"].items():
            assert gain == pytest.approx(row["least confident 2"][metric] - row["after 2"][metric], nan_ok=True)
    with pytest.raises(ValueError, match="pool"):
        quality.small_label_sets(predictor, held_out, pool, seed=0, ks=(2, 7), active_ks=(2,))


def test_units_are_computed_once_kept_and_read_back(tmp_path):
    units = Units(tmp_path / "run", {"scenes": 8, "ks": (2, 4)})
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"exact": 0.5, "labels": ("red", "blue"), "missing": float("nan")}

    first = units.get("seed0", compute)
    assert first["labels"] == ["red", "blue"] and math.isnan(first["missing"])  # as JSON reads it back
    again = Units(tmp_path / "run", {"scenes": 8, "ks": [2, 4]})  # a later run with the same options
    second = again.get("seed0", compute)
    assert len(calls) == 1 and json.dumps(second) == json.dumps(first)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "seed0.json"]
    assert Units(None).get("seed0", compute) == first and len(calls) == 2  # no folder: nothing kept


def test_units_refuse_a_folder_of_another_configuration(tmp_path):
    Units(tmp_path, {"model": "abc", "scenes": 8})
    with pytest.raises(ValueError, match="differs in model"):
        Units(tmp_path, {"model": "def", "scenes": 8})


def test_a_stopped_run_goes_on_where_it_left_off(tiny_checkpoint, tmp_path, monkeypatch):
    settings = Settings(
        model_checkpoint=str(tiny_checkpoint), device="cpu", background_words=quality.BACKGROUNDS, dense_pamr="false"
    )  # as the committed units were measured: their unit names
    bundle = load_clip(settings)
    text = TextEmbedder(bundle)
    bench = quality.Bench(bundle, text, TagCLIPConfig(), batch_size=4)
    predictor = Predictor(settings, bundle, text=text)

    def run(ks: list[int], predictor: Predictor = predictor) -> dict:
        return quality.run(bench, n_held_out=4, n_pool=6, ks=ks, epochs=2, seeds=1, predictor=predictor,
                           small_ks=((2,), (2,)), units=Units(tmp_path))  # fmt: skip

    stopped = run([2])  # a run that stopped after K = 2 ...
    for row in stopped["learning"]["rows"]:  # 2 masks are under the service's ZEGCLIP_MIN_MASKS: no head
        assert row["zegclip_steps"] == 0 and row["miou_after"] == row["miou_clipself"]
    kept = sorted(p.name for p in tmp_path.glob("seed*.json"))
    assert kept == ["seed0-learning-least-confident-k2.json", "seed0-learning-random-k2.json", "seed0.json"]
    trained = []
    real_train, real_sections = quality.train_clipself, quality.sections
    monkeypatch.setattr(quality, "train_clipself", lambda *a, **kw: trained.append(1) or real_train(*a, **kw))
    monkeypatch.setattr(quality, "sections", lambda *a, **kw: pytest.fail("sections 1-3 were measured again"))
    finished = run([2, 3])  # ... goes on: only the rows of K = 3 are trained
    assert len(trained) == 2
    assert [(r["strategy"], r["k"]) for r in finished["learning"]["rows"]] == [
        ("random", 2), ("random", 3), ("least confident", 2), ("least confident", 3)
    ]  # fmt: skip
    assert json.dumps(finished["small_sets"]) == json.dumps(stopped["small_sets"])
    assert json.dumps(finished["learning"]["rows"][0]) == json.dumps(stopped["learning"]["rows"][0])

    # section 3 with the other tag scores is a unit of its own in the same folder; section 4 is shared
    monkeypatch.setattr(quality, "sections", real_sections)
    other = run([2, 3], Predictor(dataclasses.replace(settings, tag_scores="global"), bundle, text=text))
    assert (tmp_path / "seed0-tags-global.json").is_file() and len(trained) == 2
    assert other["small_sets"]["tag_scores"] == "global" and finished["small_sets"]["tag_scores"] == "tagclip"
    assert json.dumps(other["learning"]["rows"]) == json.dumps(finished["learning"]["rows"])


def test_the_weights_digest_names_a_model_and_changes_with_any_weight(tiny_checkpoint):
    model = load_clip(Settings(model_checkpoint=str(tiny_checkpoint), device="cpu")).model
    digest = quality.weights_digest(model)
    assert digest == quality.weights_digest(model) and len(digest) == 64
    with torch.no_grad():
        model.logit_scale += 1e-3  # a 0-dim weight counts too
    assert quality.weights_digest(model) != digest


def test_the_gpu_pack_carries_every_distribution_the_gpu_run_imports_that_the_machine_lacks():
    """scripts/gpu-run on a lent GPU machine imports bench.throughput and bench.toy_clip beside
    the machine's own packages and the wheels bench.gpu_pack carries: a dependency added to the
    project without a wheel there would cost that one run."""
    from bench import gpu_pack

    imported = subprocess.run(
        [sys.executable, "-c", "import sys, importlib.metadata as md\n"
         "import bench.throughput, bench.toy_clip\n"
         "dists = md.packages_distributions()\n"
         "print('\\n'.join({d for name in list(sys.modules) for d in dists.get(name.split('.')[0], [])}))"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
    ).stdout.split()  # fmt: skip
    needed = {gpu_pack.normalised(d) for d in imported} - {"prelabel"}
    carried = {gpu_pack.normalised(w) for w in gpu_pack.WHEELS}
    assert "open-clip-torch" in needed and "torch" in needed  # the closure is really read
    assert needed - gpu_pack.ON_THE_MACHINE - gpu_pack.OPTIONAL - carried == set()
    assert carried & gpu_pack.ON_THE_MACHINE == set()  # two versions of one package stop the install
