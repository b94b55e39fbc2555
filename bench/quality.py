"""Quality benchmark on the toy world: tags, masks and the learning loop, side by side.

    python -m bench.quality --checkpoint bench/models/toy-clip --seeds 3 --json docs/quality.json --out docs/quality.md

Everything runs on held-out scenes from fixed seeds with the service's own model code. Held-out
scenes include empty ones (EMPTY_RATE: no object at all), as real projects do; every figure is
the mean and spread over ``--seeds`` independent held-out sets (and training seeds):

1. tagging mAP and F1 (TagCLIP's relative threshold) over colour and over shape classes, for the
   global embedding (plain CLIP), patch-level classification, TagCLIP with DMAR, and with DMAR +
   CWR, on all scenes and on multi-object scenes apart, and each label's AP (1b);
2. segmentation mIoU for the MaskCLIP value path and the dense heads (ClearCLIP, NACLIP), over all
   classes and restricted to the tags TagCLIP found;
3. small label sets, through the service's own ``Predictor`` (its decision rule, distractors and
   masks): projects of 1, 2, 3 and 5 colour or shape labels drawn at random, on scenes where none,
   one or several of them appear: exact tag set, recall when several are present, false tags on
   scenes with none, mask IoU of the present labels, and pre-labels accepted unchanged by the
   service's own definition (``common.quality.accepted_unchanged``); and the TAG_MIN_SCORE that
   maximises the exact tag set on the pool scenes (a calibration set apart from the held-out ones);
   then the same after the few-shot learner has fitted K corrected pool scenes (3b, 3c), K up to
   200, chosen at random or least confident first (3d);
4. the learning loop: K scenes corrected (the correction is the ground truth), CLIPSelf (its steps
   scaled with K, ``--clipself-epochs``) and a ZegCLIP head trained on them, shape masks and the
   share accepted unchanged before and after, the K scenes chosen at random or least confident
   first (by tag confidence).

Prints the tables, writes them as JSON (``--json``) and as a markdown report (``--out``). Section 4
costs hours per seed on a CPU: ``--units DIR`` keeps each finished part of the run in DIR, and the
same command run again goes on where the last one stopped (``bench/units.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.publish import publish
from bench.toy_clip import SCENE_SIZE
from bench.toyworld import BACKGROUNDS, COLOURS, SHAPES, Scene, scenes
from bench.units import Units
from common.jobs import BrushControl, ChoicesControl, ClassLabel, TaskResult
from common.labelstudio.brush import draw_scaled, rle_to_mask
from common.quality import UNCHANGED_IOU, accepted_unchanged, mask_iou, mean_average_precision, micro_f1, miou
from common.settings import PAMR_MODES, TAG_SCORES, Settings
from worker.checkpoints import version_visual
from worker.model import dense, vit
from worker.model.bundle import ClipBundle
from worker.model.preprocess import to_pixels
from worker.model.selection import TagRule, select_tags
from worker.model.tagclip import TagCLIPConfig, reidentify, run_trunk, tagclip_head
from worker.model.text import TextEmbedder
from worker.model.zegclip import ZegCLIP, ZegCLIPConfig
from worker.predictor import Predictor
from worker.training.adapt import REGION_SAMPLES, RegionSample, fit, fit_prototypes, patch_targets
from worker.training.clipself import CLIPSelfConfig, train_clipself
from worker.training.corrections import Correction
from worker.training.zegclip import (
    TrainingSample,
    calibrate_threshold,
    calibration_split,
    has_label,
    schedule,
    train_zegclip,
)

HELD_OUT_SEED, POOL_SEED = 1000, 2000  # seed s of a run uses HELD_OUT_SEED + s and POOL_SEED + s
SIZE = SCENE_SIZE
EMPTY_RATE = 0.15  # held-out scenes with no object
KINDS = {"colour": tuple(COLOURS), "shape": SHAPES}
TAG_METHODS = ("global", "patch", "dmar", "dmar+cwr")
HEADS = ("maskclip", "clearclip", "naclip")
#: (head, sliding window) rows of section 2: the whole image on TagCLIP's trunk, and the papers' slide
SEGMENTATION = tuple((h, False) for h in HEADS) + (("clearclip", True), ("naclip", True))
MIN_AREA = 0.002  # the service's default MASK_MIN_AREA
RELATIVE = TagRule("relative")  # TagCLIP's rule, for the paper's figures (sections 1, 2 and 4)
SMALL_SETS = (1, 2, 3, 5)  # label counts of the small projects of section 3
ADAPT_KS = (10, 20, 50, 100, 200)  # random corrections the few-shot learner sees in section 3
TAGS_ALONE_UP_TO = 50  # up to this K, 3c also draws masks with the tags fitted alone
ACTIVE_KS = (10, 50)  # where 3d also corrects the least confident first (each also in ADAPT_KS)
GAIN_METRICS = ("exact", "mask_iou", "accepted")  # 3d's paired differences, least confident - random
LEARNING_GAIN_METRICS = ("tag_map_after", "miou_after", "accepted_after")  # section 4's
CLIPSELF_BATCH = 8  # images per CLIPSelf step in section 4
SERVICE = Settings()  # the service's defaults: the ZegCLIP schedule and holdout the learning loop follows
MIN_SCORES = tuple(round(0.05 * i, 2) for i in range(1, 19))  # TAG_MIN_SCORE values tried on the pool


@dataclass
class Bench:
    bundle: ClipBundle
    text: TextEmbedder
    cfg: TagCLIPConfig
    batch_size: int
    input_size: int = 64  # the side scenes are resized to for the model (the service's IMAGE_SIZE)

    def class_text(self, classes: Sequence[str]) -> torch.Tensor:
        """The classes first, then the toy world's backgrounds as background words."""
        return self.text.classes([(c,) for c in classes] + [(b,) for b in BACKGROUNDS])

    def pixels(self, batch: Sequence[Scene]) -> torch.Tensor:
        side = (self.input_size, self.input_size)
        return torch.stack([to_pixels(s.image, side, self.bundle.mean, self.bundle.std) for s in batch])


def study_bench(checkpoint: str) -> Bench:
    """The bench of the small studies (``bench/recipes.py``, ``learning_recipes.py``,
    ``working_size.py``, ``last_block.py``, ``secondary_objects.py``): ``checkpoint`` on the CPU,
    scenes seen at their size."""
    from worker.loading import load_clip

    bundle = load_clip(Settings(model_checkpoint=checkpoint, device="cpu", background_words=BACKGROUNDS))
    return Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=32, input_size=SIZE)


def study_parser(doc: str, scenes: int = 200, seeds: int = 3) -> argparse.ArgumentParser:
    """The command line every small study shares (``--checkpoint``, ``--scenes``, ``--seeds``),
    described by the first line of the study's ``doc``; each study adds its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--checkpoint", default="bench/models/toy-clip")
    parser.add_argument("--scenes", type=int, default=scenes, help="held-out scenes per seed")
    parser.add_argument("--seeds", type=int, default=seeds)
    return parser


def kind_table(figures: dict[tuple[str, str], list[float]], header: str) -> str:
    """A study's markdown table: ``header`` then one row per figure (in the order measured) of mean ±
    spread (standard deviation) over seeds for each kind; rows named "... seconds" without decimals."""
    lines = [f"| {header} | colour | shape |", "|---|---|---|"]
    for row in dict.fromkeys(r for r, _ in figures):
        digits = 0 if row.endswith("seconds") else 3
        cells = [f"{np.mean(figures[row, k]):.{digits}f} ± {np.std(figures[row, k]):.{digits}f}" for k in KINDS]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def truth_tags(held_out: Sequence[Scene], kind: str) -> np.ndarray:
    names = KINDS[kind]
    present = [s.colours if kind == "colour" else s.shapes for s in held_out]
    return np.array([[name in p for name in names] for p in present])


@torch.no_grad()
def tag_scores(bench: Bench, held_out: Sequence[Scene], kind: str) -> dict[str, np.ndarray]:
    """[N, C] scores per method; all but ``global`` share one trunk pass."""
    classes = KINDS[kind]
    C, text = len(classes), bench.class_text(classes)
    visual, scale = bench.bundle.visual, bench.bundle.logit_scale
    out: dict[str, list] = {m: [] for m in TAG_METHODS}
    local = []
    for start in range(0, len(held_out), bench.batch_size):
        pixels = bench.pixels(held_out[start : start + bench.batch_size])
        image = F.normalize(vit.encode_tokens(visual, pixels)[:, 0], dim=-1)
        out["global"].append((scale * image @ text.T).softmax(dim=-1)[:, :C])
        chunk = tagclip_head(bench.bundle, run_trunk(bench.bundle, pixels, bench.cfg), text, C, bench.cfg)
        out["patch"] += [item.patch_probs[:, :C].amax(dim=0)[None] for item in chunk]
        out["dmar"] += [item.scores[None] for item in chunk]
        local += chunk
    out["dmar+cwr"] = [s[None] for s in reidentify(bench.bundle, local, text, bench.cfg, bench.batch_size)]
    return {m: torch.cat(v).float().numpy() for m, v in out.items()}


def selected(scores: np.ndarray, names: Sequence[str], rule: TagRule = RELATIVE) -> np.ndarray:
    """The decision per image, as the service makes it with ``rule``."""
    rows = []
    for row in scores:
        chosen, _ = select_tags(dict(zip(names, row.tolist(), strict=True)), True, rule)
        rows.append([name in chosen for name in names])
    return np.array(rows).reshape(len(scores), len(names))


def class_map(masks: Sequence[dense.Mask], class_ids: Sequence[int]) -> np.ndarray:
    """Masks of classes ``class_ids[m.index]`` as one map (0 where nothing was labelled)."""
    out = np.zeros((SIZE, SIZE), dtype=np.int64)
    for m in masks:
        out[draw_scaled(m.region, m.size)] = class_ids[m.index] + 1
    return out


@torch.no_grad()
def dense_maps(
    bench: Bench, held_out: Sequence[Scene], kind: str, head: str, tags: np.ndarray | None, sliding: bool = False,
    floor: float = 0.0, refine: bool = False,
) -> list:  # fmt: skip
    """Predicted class maps from a training-free head; ``tags`` [N, C] restricts the classes;
    ``sliding``: the papers' sliding-window inference instead of the whole image on TagCLIP's trunk;
    ``floor`` and ``refine`` (PAMR): as ``dense.masks_from_logits`` takes them (bench/recipes.py)."""
    classes = KINDS[kind]
    C, text = len(classes), bench.class_text(classes)
    maps = []
    for start in range(0, len(held_out), bench.batch_size):
        pixels = bench.pixels(held_out[start : start + bench.batch_size])
        trunk = run_trunk(bench.bundle, pixels, bench.cfg)
        if sliding:
            features = dense.sliding_features(bench.bundle.visual, pixels, head, bench.batch_size)
        else:
            features = dense.dense_features(bench.bundle.visual, trunk.tokens, trunk.grid, head)
        for b in range(pixels.shape[0]):
            ids = list(np.flatnonzero(tags[start + b])) if tags is not None else list(range(C))
            rows = ids + list(range(C, text.shape[0]))
            logits = dense.class_logits(features[b], text[rows], trunk.grid)
            image = pixels[b] if refine else None
            masks = dense.masks_from_logits(logits, len(ids), (SIZE, SIZE), MIN_AREA, floor=floor, image=image)
            maps.append(class_map(masks, ids))
    return maps


@torch.no_grad()
def zegclip_maps(
    bench: Bench, model: ZegCLIP, held_out: Sequence[Scene], tags: np.ndarray, kind: str = "shape"
) -> list:
    """Predicted class maps from a ZegCLIP head, for the classes ``tags`` [N, C] gives each scene."""
    text = bench.text.classes([(name,) for name in KINDS[kind]])
    maps = []
    for start in range(0, len(held_out), bench.batch_size):
        logits = model(bench.bundle.visual, bench.pixels(held_out[start : start + bench.batch_size]), text)
        for b in range(logits.shape[0]):
            ids = list(np.flatnonzero(tags[start + b]))
            if not ids:  # no class: nothing drawn
                maps.append(class_map([], ids))
                continue
            floor = model.cfg.mask_threshold
            masks = dense.masks_from_logits(logits[b, ids], len(ids), (SIZE, SIZE), MIN_AREA, "sigmoid", floor)
            maps.append(class_map(masks, ids))
    return maps


def accepted_share(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Share of scenes whose masks an annotator would accept unchanged, by the service's definition
    (``accepted_unchanged``): the same classes (a class only one side has is a tag added or
    removed), each mask within UNCHANGED_IOU of the truth."""
    accepted = 0
    for p, t in zip(predicted, truth, strict=True):
        ours, theirs = set(np.unique(p)) - {0}, set(np.unique(t)) - {0}
        ious = [mask_iou(p == c, t == c) for c in ours & theirs]
        accepted += accepted_unchanged(len(theirs - ours), len(ours - theirs), ious)
    return accepted / len(truth)


def least_confident_first(scores: np.ndarray | torch.Tensor, labels: Sequence[str], rule: TagRule) -> np.ndarray:
    """Scene indices by the confidence ``select_tags`` gives these tag ``scores`` [n, L] (how far the
    labels sit from their cut, on average), lowest first. Section 4 has no predictor to draw masks,
    so it ranks by this, the tag part of the task score Label Studio sorts by (section 3 uses all of it)."""
    confidence = [select_tags(dict(zip(labels, row.tolist(), strict=True)), True, rule)[1] for row in scores]
    return np.argsort(confidence, kind="stable")


def learning_loop(
    bench: Bench, pool, held_out, ks: Sequence[int], epochs: float, seed: int, lr: float, units: Units
) -> dict:
    """Section 4, as a project's training run does it: CLIPSelf fine-tuning (with the supervised
    terms, on the served dense path) for ``epochs`` passes over K corrected scenes (steps scaled
    with K, where the service runs TRAIN_STEPS whatever K), then, once the K scenes hold
    ZEGCLIP_MIN_MASKS masks with a label (the service's floor; below it CLIPSelf's maps are served),
    a ZegCLIP head on the fine-tuned ViT (the service's schedule: ZEGCLIP_EPOCHS passes over four
    fifths of the masks, its floor set on the other fifth). All K are training data: the held-out
    scenes do what the service's held-out corrections do. The K scenes are chosen at random or
    least confident first. Each (strategy, K) row is one of ``units``: hours of CPU at K = 200, so a
    run can stop between rows."""
    truth = [s.class_map("shape") for s in held_out]
    shape_truth = truth_tags(held_out, "shape")
    scores = tag_scores(bench, held_out, "shape")["dmar+cwr"]
    tags = selected(scores, SHAPES)
    before_maps = dense_maps(bench, held_out, "shape", "clearclip", tags)
    before = {"tag_map": mean_average_precision(scores, shape_truth), "miou": miou(before_maps, truth, len(SHAPES)),
              "accepted": accepted_share(before_maps, truth)}  # fmt: skip
    unsure_first = list(least_confident_first(tag_scores(bench, pool, "shape")["dmar+cwr"], SHAPES, RELATIVE))
    shuffled = list(range(len(pool)))
    random.Random(seed).shuffle(shuffled)
    head_cfg = ZegCLIPConfig(decoder_heads=8 if bench.bundle.visual.output_dim % 8 == 0 else 4)
    text = bench.class_text(SHAPES)
    index = {name: i for i, name in enumerate(SHAPES)}

    def measure(strategy: str, k: int, chosen: list[Scene]) -> dict:
        torch.manual_seed(seed)
        corrections = [Correction(i, None, {"shape": s.shapes}, s.class_map("shape"), SHAPES, s.image)
                       for i, s in enumerate(chosen)]  # fmt: skip
        started = time.perf_counter()
        steps = schedule(k, epochs, max_steps=10**6, batch_size=CLIPSELF_BATCH)
        weights, _ = train_clipself(
            bench.bundle.visual, bench.bundle.visual, corrections, text, index, bench.bundle.mean,
            bench.bundle.std, CLIPSelfConfig(steps=steps, batch_size=CLIPSELF_BATCH, lr=lr,
                                             size=bench.input_size, dense_head="clearclip"), seed=seed,
        )  # fmt: skip
        tuned_bundle = dataclasses.replace(bench.bundle, visual=version_visual(bench.bundle.visual, weights))
        tuned = dataclasses.replace(bench, bundle=tuned_bundle)
        tuned_scores = tag_scores(tuned, held_out, "shape")["dmar+cwr"]
        tuned_tags = selected(tuned_scores, SHAPES)
        clipself_maps = dense_maps(tuned, held_out, "shape", "clearclip", tuned_tags)
        masks = [TrainingSample(s.image, m, SHAPES) for s in chosen if has_label(m := s.class_map("shape"))]
        served_maps, head_steps = clipself_maps, 0
        if len(masks) >= SERVICE.zegclip_min_masks:  # as the service: no head on fewer masks with a label
            samples, aside = calibration_split(masks, SERVICE.train_holdout)
            head_steps = schedule(len(samples), SERVICE.zegclip_epochs, SERVICE.zegclip_max_steps)
            head, _ = train_zegclip(tuned_bundle, samples, SHAPES, head_cfg, steps=head_steps, lr=1e-3,
                                    size=bench.input_size, seed=seed)  # fmt: skip
            calibrate_threshold(tuned_bundle, head, aside, SHAPES, bench.input_size)
            served_maps = zegclip_maps(tuned, head, held_out, tuned_tags)
        final = miou(served_maps, truth, len(SHAPES))
        return {
            "strategy": strategy, "k": k,
            "tag_map_before": before["tag_map"],
            "tag_map_after": mean_average_precision(tuned_scores, shape_truth),
            "miou_before": before["miou"], "miou_clipself": miou(clipself_maps, truth, len(SHAPES)),
            "miou_after": final, "accepted_before": before["accepted"],
            "accepted_after": accepted_share(served_maps, truth),
            "gain_per_correction": (final - before["miou"]) / k, "clipself_steps": steps,
            "zegclip_steps": head_steps,
            "train_seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip

    rows = []
    for strategy, order in (("random", shuffled), ("least confident", unsure_first)):
        for k in ks:
            chosen = [pool[i] for i in order[:k]]
            name = f"seed{seed}-learning-{strategy.replace(' ', '-')}-k{k}"
            rows.append(units.get(name, functools.partial(measure, strategy, k, chosen)))
            print(json.dumps(rows[-1]), flush=True)
    by_row = {(r["strategy"], r["k"]): r for r in rows}  # paired: same seed, pool and held-out scenes
    gains = [{"k": k, **{m: by_row["least confident", k][m] - by_row["random", k][m] for m in LEARNING_GAIN_METRICS}}
             for k in ks]  # fmt: skip
    return {"before": before, "rows": rows, "gains": gains, "clipself_lr": lr, "clipself_epochs": epochs}


@dataclass
class CorrectedPool:
    """One small project's pool scenes as the few-shot learner reads them once corrected."""

    kind: str
    labels: tuple[str, ...]
    scores: torch.Tensor  # [n, L] TagCLIP scores, before any adapter
    embeddings: torch.Tensor  # [n, E] image embeddings
    truth: np.ndarray  # [n, L] which labels each scene shows
    regions: list[RegionSample]  # each scene painted as the project's annotators would paint it
    text: torch.Tensor  # [L, E] the labels' mask text
    background: torch.Tensor  # [B, E] the background words the masks compete with


def after_corrections(predictor: Predictor, pool: CorrectedPool, chosen: np.ndarray, held_out: Sequence[Scene],
                      prepared: list, tags_alone: bool) -> dict:  # fmt: skip
    """The project's figures once the few-shot learner has fitted the ``chosen`` pool scenes: tag
    thresholds and cache, then region prototypes; ``tags_alone`` also measures masks without them."""
    default = predictor.settings.tag_min_score
    few_shot = fit(pool.scores[chosen], pool.embeddings[chosen], pool.truth[chosen], pool.labels, default,
                   predictor.settings.tag_scores).few_shot  # fmt: skip
    newest = chosen[-REGION_SAMPLES:]  # as fit_adapter: prototypes from the newest corrected masks
    prototypes, _ = fit_prototypes([pool.regions[i] for i in newest], pool.text, pool.background, pool.labels,
                                   predictor.dense_kind)  # fmt: skip
    figures, extra = {}, {}
    if tags_alone or not prototypes:
        figures = project_figures(predictor.with_few_shot(few_shot), held_out, prepared, pool.kind, pool.labels)
        extra = {"mask_iou_tags_only": figures["mask_iou"]} if tags_alone else {}
    if prototypes:
        adapted = predictor.with_few_shot(dataclasses.replace(few_shot, prototypes=prototypes))
        figures = project_figures(adapted, held_out, prepared, pool.kind, pool.labels)
    return {**figures, **extra, "alpha": few_shot.adapter.alpha if few_shot.adapter else 0.0,
            "gamma": prototypes.gamma if prototypes else 0.0}  # fmt: skip


def small_label_sets(
    predictor: Predictor, held_out: Sequence[Scene], pool: Sequence[Scene], seed: int, ks: Sequence[int] = ADAPT_KS,
    active_ks: Sequence[int] = ACTIVE_KS, kinds: Sequence[str] = tuple(KINDS),
) -> dict:  # fmt: skip
    """Section 3: projects of a few labels drawn at random (seeded), through the service's predictor,
    before and after the few-shot learner has seen K corrected pool scenes. The K scenes are random
    ones ("after K", nested: the first 10 of the 20) and, for ``active_ks``, the lowest task scores
    the service gives Label Studio before any correction ("least confident K"), as a project
    reviewing Label Studio's lowest-scored tasks first picks them; with their gain over random."""
    if max((*ks, *active_ks), default=0) > len(pool):
        raise ValueError(f"K = {max((*ks, *active_ks))} corrections need a pool of at least as many scenes, "
                         f"not {len(pool)}")  # fmt: skip
    if not set(active_ks) <= set(ks):
        raise ValueError(f"each K of {tuple(active_ks)} (least confident) must also be run at random: {tuple(ks)}")
    prepared = list(predictor.prepare([s.image for s in held_out]))
    out: dict = {}
    for corrected, pool_results, random_order in corrected_projects(predictor, pool, seed, kinds):
        kind, labels = corrected.kind, corrected.labels
        figures = {"before": project_figures(predictor, held_out, prepared, kind, labels)}
        sweep = tag_sweep(pool, pool_results, kind, labels)
        unsure_first = np.argsort([r.score for r in pool_results], kind="stable")
        for k in ks:
            figures[f"after {k}"] = after_corrections(predictor, corrected, random_order[:k], held_out, prepared,
                                                      tags_alone=k <= TAGS_ALONE_UP_TO)  # fmt: skip
        for k in active_ks:
            active = after_corrections(predictor, corrected, unsure_first[:k], held_out, prepared, tags_alone=False)
            gain = {m: active[m] - figures[f"after {k}"][m] for m in GAIN_METRICS}  # paired: same seed and labels
            figures[f"least confident {k}"] = {**active, "gain_over_random": gain}
        out[f"{kind} x{len(labels)}"] = {**figures, "labels": list(labels), "best_min_score": max(sweep, key=sweep.get)}
    return {**out, "dense_head": predictor.settings.dense_head, "tag_scores": predictor.settings.tag_scores,
            "dense_pamr": predictor.settings.dense_pamr}  # fmt: skip


def corrected_projects(
    predictor: Predictor, pool: Sequence[Scene], seed: int, kinds: Sequence[str] = tuple(KINDS)
) -> Iterator[tuple[CorrectedPool, list[TaskResult], np.ndarray]]:
    """Section 3's projects of ``seed`` (labels drawn at random, seeded): each as the few-shot
    learner reads its pool scenes once corrected, the service's pre-labels of those scenes (as Label
    Studio gets them, before any correction) and the random order an annotator corrects them in."""
    rng = np.random.default_rng(seed)
    pool_prepared = list(predictor.prepare([s.image for s in pool]))
    pool_features = predictor.region_features(pool_prepared)
    for kind, names in KINDS.items():
        if kind not in kinds:  # its labels are drawn last: the others' stay the same
            continue
        for n in SMALL_SETS:
            labels = tuple(str(name) for name in rng.choice(names, n, replace=False))
            pool_results = _predict(predictor, pool_prepared, kind, labels, masks=True)
            project = [ClassLabel(x, (x,)) for x in labels]
            with torch.inference_mode():
                scores, embeddings = predictor.label_scores(pool_prepared, project)
            text, background = predictor.mask_text(project, project)
            corrected = CorrectedPool(
                kind, labels, scores, embeddings,
                truth=np.array([[x in _present(s, kind, labels) for x in labels] for s in pool]),
                regions=[_region_sample(s, kind, labels, *f) for s, f in zip(pool, pool_features, strict=True)],
                text=text, background=background,
            )  # fmt: skip
            yield corrected, pool_results, rng.permutation(len(pool))


def _region_sample(scene: Scene, kind: str, labels: tuple[str, ...], features: torch.Tensor,
                   grid: tuple[int, int]) -> RegionSample:  # fmt: skip
    """A pool scene as an annotator of the project corrects it: its labels painted, the rest none."""
    names, classes = KINDS[kind], scene.class_map(kind)
    mask = np.zeros(classes.shape, dtype=np.uint8)
    for k, label in enumerate(labels, start=1):
        mask[classes == 1 + names.index(label)] = k
    correction = Correction(0, None, mask=mask, mask_labels=labels)
    return RegionSample(features, patch_targets(correction, labels, grid))


def _predict(predictor: Predictor, prepared: list, kind: str, labels: tuple[str, ...], masks: bool) -> list:
    control = tuple(ClassLabel(label, (label,)) for label in labels)
    brushes = [BrushControl("masks", "image", control)] if masks else []
    results, _ = predictor.run(list(range(len(prepared))), prepared, [ChoicesControl("tags", "image", control, True)],
                               brushes)  # fmt: skip
    return results


def _present(scene: Scene, kind: str, labels: tuple[str, ...]) -> set[str]:
    return set(labels) & (scene.colours if kind == "colour" else scene.shapes)


def project_figures(predictor: Predictor, held_out, prepared, kind: str, labels: tuple[str, ...]) -> dict:
    """Tags and masks of one small project on the held-out scenes, as an annotator would find them."""
    names = KINDS[kind]
    exact = accepted = none = false_on_none = found = several = 0
    ious: list[float] = []
    for scene, result in zip(held_out, _predict(predictor, prepared, kind, labels, masks=True), strict=True):
        present, chosen = _present(scene, kind, labels), set(result.choices[0].selected)
        exact += chosen == present
        if not present:
            none += 1
            false_on_none += bool(chosen)
        if len(present) >= 2:
            several += len(present)
            found += len(present & chosen)
        truth = scene.class_map(kind)
        drawn = {m.label: rle_to_mask(m.rle, *scene.image.size) for m in result.masks}
        empty = np.zeros(truth.shape, dtype=bool)
        label_ious = {label: mask_iou(drawn.get(label, empty), truth == 1 + names.index(label))
                      for label in present | set(drawn)}  # fmt: skip
        ious += [label_ious[label] for label in present]
        accepted += accepted_unchanged(len(present - chosen), len(chosen - present), label_ious.values())
    return {
        "exact": exact / len(held_out),
        "recall_several": found / several if several else float("nan"),
        "false_on_none": false_on_none / none if none else float("nan"),
        "mask_iou": float(np.mean(ious)) if ious else float("nan"),
        "accepted": accepted / len(held_out),
        "scenes": {"none": none, "several": sum(len(_present(s, kind, labels)) >= 2 for s in held_out)},
    }


def tag_sweep(pool, results: Sequence[TaskResult], kind: str, labels: tuple[str, ...]) -> dict[float, float]:
    """Exact tag-set rate on the pool scenes for each TAG_MIN_SCORE in MIN_SCORES, re-deciding the
    tags of the predictor's ``results`` on them."""
    rates = {}
    for t in MIN_SCORES:
        rule = TagRule("absolute", min_score=t)
        hits = [set(select_tags(r.choices[0].scores, True, rule)[0]) == _present(s, kind, labels)
                for s, r in zip(pool, results, strict=True)]  # fmt: skip
        rates[t] = float(np.mean(hits))
    return rates


def run_seed(bench: Bench, predictor: Predictor | None, n_held_out: int, n_pool: int, ks: Sequence[int], epochs: float,
             seed: int, lr: float, small_ks: tuple[Sequence[int], Sequence[int]], units: Units) -> dict:  # fmt: skip
    """Every section on the held-out and pool scenes of one seed; ``small_ks`` are section 3's
    random and least confident K. Sections 1-3 are one of ``units``, each row of section 4 another."""
    held_out = scenes(HELD_OUT_SEED + seed, n_held_out, SIZE, empty_rate=EMPTY_RATE)
    pool = scenes(POOL_SEED + seed, n_pool, SIZE, empty_rate=EMPTY_RATE)

    def measure() -> dict:
        torch.manual_seed(seed)
        return sections(bench, predictor, held_out, pool, seed, small_ks)

    # section 3's tag scores and PAMR name their own unit: each variant shares the folder and its section 4 rows
    tag_scores = predictor.settings.tag_scores if predictor is not None else "tagclip"
    pamr = predictor.settings.dense_pamr if predictor is not None else "false"
    name = f"seed{seed}" + ("" if tag_scores == "tagclip" else f"-tags-{tag_scores}") + \
        {"false": "", "true": "-pamr", "auto": "-pamr-auto"}[pamr]  # fmt: skip
    report = units.get(name, measure)
    if ks:
        objects = [s for s in pool if s.objects]
        report["learning"] = learning_loop(bench, objects, held_out, ks, epochs, seed, lr, units)
    return report


def sections(bench: Bench, predictor: Predictor | None, held_out: Sequence[Scene], pool: Sequence[Scene], seed: int,
             small_ks: tuple[Sequence[int], Sequence[int]]) -> dict:  # fmt: skip
    """Sections 1-3 of one seed (section 3 only with a ``predictor``)."""
    multi = [i for i, s in enumerate(held_out) if len(s.objects) >= 2]
    report: dict = {"tagging": {}, "tagging_multi": {}, "per_label_ap": {}, "segmentation": {},
                    "scenes": len(held_out), "empty_scenes": sum(not s.objects for s in held_out),
                    "multi_object_scenes": len(multi)}  # fmt: skip
    restricted: dict[str, np.ndarray] = {}
    for kind, names in KINDS.items():
        truth = truth_tags(held_out, kind)
        scores = tag_scores(bench, held_out, kind)
        report["tagging"][kind] = {
            m: {"mAP": mean_average_precision(s, truth), "F1": micro_f1(selected(s, names), truth)}
            for m, s in scores.items()
        }
        report["tagging_multi"][kind] = {m: mean_average_precision(s[multi], truth[multi]) for m, s in scores.items()}
        report["per_label_ap"][kind] = {
            name: mean_average_precision(scores["dmar+cwr"][:, [c]], truth[:, [c]]) if truth[:, c].any() else None
            for c, name in enumerate(names)
        }
        restricted[kind] = selected(scores["dmar+cwr"], names)
    for head, sliding in SEGMENTATION:
        for restrict in (False, True):
            key = f"{head}{' sliding' if sliding else ''}{' + tags' if restrict else ''}"
            report["segmentation"][key] = {
                kind: miou(dense_maps(bench, held_out, kind, head, restricted[kind] if restrict else None, sliding),
                           [s.class_map(kind) for s in held_out], len(names))
                for kind, names in KINDS.items()
            }  # fmt: skip
    if predictor is not None:
        report["small_sets"] = small_label_sets(predictor, held_out, pool, seed, *small_ks)
    return report


def combine(runs: list) -> object:
    """Per-seed reports -> one report of the same shape whose numbers are {mean, std, runs}; std is
    the sample standard deviation over the seeds that measured it (0 for one)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: combine([r[key] for r in runs]) for key in first}
    if isinstance(first, list) and first and isinstance(first[0], dict):
        return [combine(list(rows)) for rows in zip(*runs, strict=True)]
    if isinstance(first, int) and all(r == first for r in runs):  # a count every seed shares (K, scenes)
        return first
    numbers = [r for r in runs if r is not None]
    if numbers and all(isinstance(r, int | float) and not isinstance(r, bool) for r in numbers):
        values = np.array([np.nan if r is None else r for r in runs], dtype=float)  # None: not measurable
        kept = values[~np.isnan(values)]
        std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0 if kept.size else None
        return {"mean": float(kept.mean()) if kept.size else None, "std": std,
                "runs": [None if np.isnan(v) else float(v) for v in values]}  # fmt: skip
    return first if all(r == first for r in runs) else runs


def run(
    bench: Bench, n_held_out: int, n_pool: int, ks: Sequence[int], epochs: float, seeds: int = 1, lr: float = 1e-4,
    predictor: Predictor | None = None, small_ks: tuple[Sequence[int], Sequence[int]] = (ADAPT_KS, ACTIVE_KS),
    units: Units | None = None,
) -> dict:  # fmt: skip
    """All sections for each of ``seeds`` seeds, combined; ``predictor`` runs section 3 at the
    random and least confident K of ``small_ks``; ``units`` keeps what is finished (default: nothing
    is kept)."""
    units = units or Units(None)
    runs = []
    for seed in range(seeds):
        runs.append(run_seed(bench, predictor, n_held_out, n_pool, ks, epochs, seed, lr, small_ks, units))
        print(json.dumps({"seed": seed, "done": True}), flush=True)
    report = combine(runs)
    assert isinstance(report, dict)
    report["seeds"] = seeds
    report["input_size"] = bench.input_size
    return report


def mean_of(figure: dict | float) -> float:
    """A combined figure's mean (a count all seeds share is a plain number)."""
    return figure["mean"] if isinstance(figure, dict) else figure


def cell(figure: dict | None, percent: bool = False) -> str:
    """``mean ± std`` of a combined figure (``std`` left out for a single seed)."""
    if not isinstance(figure, dict) or figure.get("mean") is None:
        return "n/a"
    mean, std, n = figure["mean"], figure["std"], len(figure["runs"])
    if percent:
        return f"{mean:.1%}" + (f" ± {std:.1%}" if n > 1 else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")


def markdown(report: dict, command: str, description: str) -> str:
    lines = [
        "# Quality on the toy world",
        "",
        f"Produced by `{command}` on {dt.date.today().isoformat()} ({platform.processor() or platform.machine()},",
        f"CPU, torch {torch.__version__}), model: {description}. Per seed {mean_of(report['scenes']):.0f} held-out "
        f"scenes of {SIZE} x {SIZE} pixels ({mean_of(report['empty_scenes']):.0f} empty, "
        f"{mean_of(report['multi_object_scenes']):.0f} with several objects), seen by the model at "
        f"{report['input_size']} pixels; mean ± spread (sample std) over {report['seeds']} seeds. See "
        "`bench/quality.py` for the definitions.",
        "",
        "## 1. Tagging",
        "",
        "| method | colour mAP | colour F1 | shape mAP | shape F1 | colour mAP, several objects | "
        "shape mAP, several objects |",
        "|---|---|---|---|---|---|---|",
    ]
    tags, multi = report["tagging"], report["tagging_multi"]
    for m in TAG_METHODS:
        c, s = tags["colour"][m], tags["shape"][m]
        lines.append(f"| {m} | {cell(c['mAP'])} | {cell(c['F1'])} | {cell(s['mAP'])} | {cell(s['F1'])} | "
                     f"{cell(multi['colour'][m])} | {cell(multi['shape'][m])} |")  # fmt: skip
    lines += ["", "F1 uses TagCLIP's relative rule (TAG_RULE=relative), as the paper does.", ""]
    lines += per_label_markdown(report["per_label_ap"])
    lines += ["## 2. Segmentation (mIoU, background included)", "",
              "| head | colour mIoU | shape mIoU |", "|---|---|---|"]  # fmt: skip
    for key, row in report["segmentation"].items():
        lines.append(f"| {key} | {cell(row['colour'])} | {cell(row['shape'])} |")
    if "small_sets" in report:
        lines += small_sets_markdown(report["small_sets"])
    if "learning" in report:
        lines += learning_markdown(report["learning"])
    return "\n".join(lines) + "\n"


def per_label_markdown(per_label: dict) -> list[str]:
    """Section 1b: each label's AP (dmar+cwr), colours and shapes side by side."""
    colours, shapes = list(per_label["colour"].items()), list(per_label["shape"].items())
    lines = ["### 1b. Per label (dmar+cwr AP)", "", "| colour | AP | shape | AP |", "|---|---|---|---|"]
    for (colour, c), (shape, s) in itertools.zip_longest(colours, shapes, fillvalue=("", None)):
        lines.append(f"| {colour} | {cell(c) if colour else ''} | {shape} | {cell(s) if shape else ''} |")
    return lines + [""]


def small_sets_markdown(small: dict) -> list[str]:
    lines = [
        "",
        "## 3. Small label sets, as the service decides (TAG_RULE=absolute, builtin distractors, "
        f"TAG_SCORES={small.get('tag_scores', 'tagclip')}, DENSE_HEAD={small['dense_head']}"
        f"{', DENSE_PAMR=' + small['dense_pamr'] if small.get('dense_pamr', 'false') != 'false' else ''})",
        "",
        "Each seed draws its own labels. Accepted = the service's definition: tags exact and every mask "
        f"within IoU {UNCHANGED_IOU} of the truth.",
        "",
        "| project | exact tag set | recall, several present | false tags, none present | mask IoU, present "
        "labels | accepted unchanged | best TAG_MIN_SCORE on the pool |",
        "|---|---|---|---|---|---|---|",
    ]
    projects = {key: row for key, row in small.items() if key not in ("dense_head", "tag_scores", "dense_pamr")}
    for key, row in projects.items():
        b = row["before"]
        lines.append(f"| {key} | {cell(b['exact'], True)} | {cell(b['recall_several'], True)} | "
                     f"{cell(b['false_on_none'], True)} | {cell(b['mask_iou'])} | {cell(b['accepted'], True)} | "
                     f"{cell(row['best_min_score'])} |")  # fmt: skip
    first = next(iter(projects.values()))  # every project holds the same K
    after = [key for key in first if key.startswith("after ")]
    if not after:
        return lines
    last = after[-1]
    lines += [
        "",
        "### 3b. After the few-shot learner (thresholds + Tip-Adapter cache fitted on K random corrected scenes; "
        "masks with region prototypes, 3c)",
        "",
        "| project | exact before | " + " | ".join(f"exact {k}" for k in after) + f" | recall several, {last} |",
        "|---|---|" + "---|" * len(after) + "---|",
    ]
    for key, row in projects.items():
        lines.append(f"| {key} | {cell(row['before']['exact'], True)} | "
                     + " | ".join(cell(row[k]["exact"], True) for k in after)
                     + f" | {cell(row[last]['recall_several'], True)} |")  # fmt: skip
    for metric, title in (("false_on_none", "False tags on images with none of the labels"),
                          ("accepted", "Pre-labels accepted unchanged (the service's definition)")):  # fmt: skip
        lines += [
            "",
            f"{title}, before and after K corrections:",
            "",
            "| project | before | " + " | ".join(after) + " |",
            "|---|---|" + "---|" * len(after),
        ]
        for key, row in projects.items():
            lines.append(f"| {key} | {cell(row['before'][metric], True)} | "
                         + " | ".join(cell(row[k][metric], True) for k in after) + " |")  # fmt: skip
    alone = {key for key in after if "mask_iou_tags_only" in first[key]}
    heads = [f"tags {k} | + prototypes {k}" if k in alone else f"+ prototypes {k}" for k in after]
    lines += [
        "",
        "### 3c. Masks after the few-shot learner: tags fitted alone, then with region prototypes "
        "(mask IoU of the present labels)",
        "",
        "| project | before | " + " | ".join(heads) + f" | gamma chosen, {last} |",
        "|---|---|" + "---|" * (len(after) + len(alone)) + "---|",
    ]
    for key, row in projects.items():
        masks = [(f"{cell(row[k]['mask_iou_tags_only'])} | " if k in alone else "") + cell(row[k]["mask_iou"])
                 for k in after]  # fmt: skip
        lines.append(f"| {key} | {cell(row['before']['mask_iou'])} | " + " | ".join(masks)
                     + f" | {cell(row[last]['gamma'])} |")  # fmt: skip
    active = [key.removeprefix("least confident ") for key in first if key.startswith("least confident ")]
    if not active:
        return lines
    lines += [
        "",
        "### 3d. Which corrections: random against least confident first (the few-shot learner, as in 3b and 3c)",
        "",
        "Least confident = the lowest task scores the service gives Label Studio before any correction (the mean "
        "of its tag confidences and mask scores), as a project reviewing its lowest-scored tasks first corrects "
        "them. Gain = least confident - random, per seed (same labels, same held-out scenes), then mean ± spread.",
        "",
        "| project | K | exact, random | exact, least confident | gain | mask IoU, random | "
        "mask IoU, least confident | gain | accepted, random | accepted, least confident | gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in projects.items():
        for k in active:
            chance, unsure = row[f"after {k}"], row[f"least confident {k}"]
            triples = [(cell(chance[f], f != "mask_iou"), cell(unsure[f], f != "mask_iou"),
                        cell(unsure["gain_over_random"][f], f != "mask_iou")) for f in GAIN_METRICS]  # fmt: skip
            lines.append(f"| {key} | {k} | " + " | ".join(" | ".join(t) for t in triples) + " |")
    return lines


def learning_markdown(learning: dict) -> list[str]:
    before = learning["before"]
    lines = [
        "",
        "## 4. Learning loop and active learning (shape tags and masks)",
        "",
        f"As a project's training run: CLIPSelf + supervised terms ({mean_of(learning['clipself_epochs']):g} passes "
        f"over the K corrections in steps of {CLIPSELF_BATCH}, lr "
        f"{mean_of(learning['clipself_lr'])}, on the served ClearCLIP path, class token held), then a ZegCLIP head "
        f"on the fine-tuned ViT ({SERVICE.zegclip_epochs:g} passes over four fifths of the K masks, floor set on the "
        f"other fifth) once they hold {SERVICE.zegclip_min_masks} masks with a label, as the service does (below that, "
        "ZegCLIP steps 0: CLIPSelf's maps are served).",
        f"Before any correction: shape tag mAP {cell(before['tag_map'])}, mask mIoU (ClearCLIP + tags) "
        f"{cell(before['miou'])}, accepted unchanged {cell(before['accepted'], True)}.",
        "",
        "| chosen | K | tag mAP after | mIoU after CLIPSelf | mIoU after + ZegCLIP | accepted after | "
        "mIoU gain per correction | CLIPSelf steps | ZegCLIP steps | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in learning["rows"]:
        lines.append(f"| {r['strategy']} | {r['k']} | {cell(r['tag_map_after'])} | {cell(r['miou_clipself'])} | "
                     f"{cell(r['miou_after'])} | {cell(r['accepted_after'], True)} | "
                     f"{cell(r['gain_per_correction'])} | {r['clipself_steps']} | {r['zegclip_steps']} | "
                     f"{cell(r['train_seconds'])} |")  # fmt: skip
    lines += [
        "",
        "Least confident first - random, per seed (same pool, seed and held-out scenes), then mean ± spread:",
        "",
        "| K | tag mAP gain | mIoU gain | accepted gain |",
        "|---|---|---|---|",
    ]
    for g in learning["gains"]:
        lines.append(f"| {g['k']} | {cell(g['tag_map_after'])} | {cell(g['miou_after'])} | "
                     f"{cell(g['accepted_after'], True)} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    from worker.loading import load_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bench/models/toy-clip")
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes per seed")
    parser.add_argument("--pool", type=int, default=300, help="scenes the annotator may correct, per seed")
    parser.add_argument("--seeds", type=int, default=3, help="independent held-out sets and training seeds")
    parser.add_argument("--image-size", type=int, default=SIZE, help="the side the model sees (IMAGE_SIZE)")
    parser.add_argument("--dense-head", default="clearclip", choices=HEADS,
                        help="the service's DENSE_HEAD in section 3 (section 2 measures them all)")  # fmt: skip
    parser.add_argument("--tag-scores", default="tagclip", choices=TAG_SCORES,
                        help="the service's TAG_SCORES in section 3; a units folder keeps each one's sections "
                        "1-3 apart and shares section 4")  # fmt: skip
    parser.add_argument("--dense-pamr", default="false", choices=PAMR_MODES,
                        help="the service's DENSE_PAMR in section 3 (masks refined along the image's edges); "
                        "false, as the committed units were measured")  # fmt: skip
    parser.add_argument("--k", type=int, nargs="*", default=[10, 50, 100], help="corrections per run (none: skip)")
    parser.add_argument(
        "--clipself-epochs",
        type=float,
        default=24.0,
        help="section 4: CLIPSelf passes over the K corrections (24: the service's 300 steps at K=100)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="CLIPSelf learning rate (the service's TRAIN_LR)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--units", type=Path, help="keep each finished unit of the run here, and read back those "
                        "a run with the same options finished (bench/units.py)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.pool < max(ADAPT_KS):
        parser.error(f"--pool {args.pool}: section 3 corrects up to {max(ADAPT_KS)} pool scenes")

    settings = Settings(model_checkpoint=args.checkpoint, device="cpu", image_size=args.image_size,
                        background_words=BACKGROUNDS, dense_head=args.dense_head,
                        tag_scores=args.tag_scores, dense_pamr=args.dense_pamr)  # fmt: skip
    bundle = load_clip(settings)
    text = TextEmbedder(bundle)
    bench = Bench(bundle, text, TagCLIPConfig(), batch_size=32, input_size=args.image_size)
    predictor = Predictor(settings, bundle, text=text)
    units = Units(None)
    if args.units:  # the weights are hashed only for a folder to check them against
        config = {"model": weights_digest(bundle.model), "scenes": args.scenes, "pool": args.pool,
                  "image_size": args.image_size, "dense_head": args.dense_head,
                  "clipself_epochs": args.clipself_epochs, "lr": args.lr}  # fmt: skip
        try:
            units = Units(args.units, config)
        except ValueError as error:
            parser.error(str(error))
    report = run(bench, args.scenes, args.pool, args.k, args.clipself_epochs, args.seeds, args.lr, predictor,
                 units=units)  # fmt: skip
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(markdown(report, command, bundle.description), report, args.json, args.out)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: which model a units folder's figures were measured on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return digest.hexdigest()


if __name__ == "__main__":
    main()
