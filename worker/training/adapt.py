"""The fast learner: a project's first corrections change its tags within seconds, long before a
GPU training run (docs/algorithms.md section 6).

When corrections arrive (the annotation webhook), an ``adapt`` job:

1. pulls the project's corrections from Label Studio and fetches their images, as training does;
2. holds out the same tasks as training (a fifth, by a hash of the task id);
3. scores and embeds the other corrections with the active version, and fits on them one tag
   threshold per label (inside the gap between the tasks that hold it and those that do not) and
   the few-shot adapter's blend (``alpha``, ``beta``; ``alpha`` 0 is no cache), judged on tasks
   neither saw; with corrected masks and no ZegCLIP head, also the region prototypes, kept when
   they draw the corrected masks better than text alone, each image left out in turn;
4. measures the candidate and the active version on the held-out corrections and promotes the
   candidate only through the gate training runs use, and only when it is better on some metric
   (each promotion makes Label Studio predict the project's tasks again).

The candidate keeps the active version's trained blocks and head: this learner adds to them.
Training runs refit it on their own candidate, so a newly trained ViT never serves a stale cache.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.jobs import ClassLabel, TrainJob
from common.versions import Registry
from worker.checkpoints import carry_over, write_adapter
from worker.model.adapter import FewShot, RegionPrototypes, TipAdapter
from worker.predictor import Predictor
from worker.training.corrections import (
    FETCH_SHARE,
    MASK_LABELS,
    Correction,
    fetch_images,
    mask_labels,
    pull_corrections,
    split,
)
from worker.training.evaluate import GATED, judge
from worker.training.loop import ShouldStop, check_stop

log = logging.getLogger(__name__)

#: The blends tried (Tip-Adapter searches its alpha and beta on validation data the same way).
ALPHAS = (0.0, 0.25, 0.5, 0.75)
BETAS = (1.0, 3.0, 5.5, 10.0, 30.0)  # 5.5 is Tip-Adapter's default; sharper ones for large caches
#: Tag thresholds (``best_thresholds``): how many errors above the fewest a cut may make on the
#: corrected tasks, how wide (in logits) the band is in which a score on the wrong side of a cut
#: counts as partly an error, and by how much a cut nearer the default may exceed the least such
#: count. Chosen on the toy world's small projects (docs/algorithms.md section 6).
EXTRA_ERRORS, SOFTNESS, TOLERANCE = 1, 0.5, 0.1
#: Blends are judged on tasks neither their thresholds nor their cache saw, in this many folds; a
#: cache must get CACHE_MARGIN more tag sets right than thresholds alone, or this share if more,
#: and win more of the tasks where the two differ than chance would (one-sided sign test at
#: CACHE_P, a conservative level: fifteen blends are tried).
FOLDS, CACHE_MARGIN, CACHE_MARGIN_SHARE, CACHE_P = 5, 3, 0.05, 0.01
#: The candidate cuts of a label besides its scores' midpoints: a grid over its scores' range.
GRID = 201
#: The most cells an array of a threshold fit holds (float64: 8 MB; a few exist at once).
CELLS = 1 << 20
#: A label's region prototype replaces its text embedding in the masks (gamma 1), kept only when
#: that draws the corrected masks better than text alone (gamma 0). Intermediate weights chosen on
#: the corrected masks chased noise: on the toy world's colour projects none beat the prototype
#: alone on held-out images by more than 0.015 IoU, and a wrong pick cost up to 0.45
#: (docs/algorithms.md section 6).
GAMMAS = (0.0, 1.0)
#: A patch's target in ``RegionSample``: no label applies; nothing is known.
NO_LABEL, UNKNOWN = -1, -2
#: Corrected masks the region prototypes are fitted on (the newest tasks): their dense features
#: stay in memory while fitting (a few MB per photo at IMAGE_SIZE 448).
REGION_SAMPLES = 100


@dataclass(frozen=True)
class Fitted:
    few_shot: FewShot  # adapter None: the cache did not win out of fold (cache_wins)
    exact: float  # share of training corrections whose tag set thresholds fitted without them get right
    region_miou: dict[float, float] = dataclasses.field(default_factory=dict)  # gamma -> masks' mean IoU, left out


@dataclass(frozen=True)
class RegionSample:
    """One corrected mask on its image's patch grid, beside the image's dense features."""

    features: Tensor  # [h*w, E] training-free dense features
    target: Tensor  # [h*w] long: index into the labels fitted, NO_LABEL or UNKNOWN


def newest(corrections: list[Correction], count: int) -> list[Correction]:
    """The ``count`` corrections of the newest tasks (highest ids)."""
    order = sorted(corrections, key=lambda c: (0, c.task_id, "") if isinstance(c.task_id, int) else (1, 0, c.task_id))
    return order[-count:]


def better(candidate: dict[str, float], active: dict[str, float]) -> bool:
    """Whether the candidate beats the active version on at least one gated metric."""
    return any(m in candidate and m in active and candidate[m] > active[m] for m in GATED)


def project_labels(job: TrainJob) -> list[ClassLabel]:
    """Every label of the project's controls, once per name."""
    labels = [label for control in (*job.choices, *job.brushes, *job.regions) for label in control.labels]
    return list({label.name: label for label in labels}.values())


def presence(corrections: Sequence[Correction], names: Sequence[str]) -> np.ndarray:
    """[n, L] booleans: the annotator's tags, mask and polygon labels and box labels of each task."""
    rows = []
    for c in corrections:
        present = set(c.all_tags) | {label for label, _ in c.boxes}
        if c.mask is not None:
            present |= {c.mask_labels[k - 1] for k in np.unique(c.mask) if 0 < k <= len(c.mask_labels)}
        rows.append([name in present for name in names])
    return np.array(rows, dtype=bool).reshape(len(corrections), len(names))


def leave_one_out(scores: Tensor, embeddings: Tensor, truth: Tensor, alpha: float, beta: float) -> Tensor:
    """[n, L] blended scores, each task's cache answer made from the other tasks only."""
    if alpha == 0 or len(scores) < 2:
        return scores.float()
    affinity = torch.exp(-beta * (1 - embeddings.float() @ embeddings.float().T))
    affinity.fill_diagonal_(0)
    cache = affinity @ truth.float() / affinity.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (1 - alpha) * scores.float() + alpha * cache


def best_thresholds(scores: np.ndarray, truth: np.ndarray, default: float) -> np.ndarray:
    """[L] tag thresholds from the corrected tasks' ``scores`` [n, L] and whether each holds each
    label (``truth`` [n, L]).

    Counting errors alone ties a whole gap between the classes and put the cut at the edge of the
    gap nearest ``default``, just past a corrected score, where the next task's score falls on the
    wrong side. Here each score also counts as an error by how near it lies to the cut on the wrong
    side (a Gaussian-smoothed count, ``SOFTNESS`` wide in logits: scores are probabilities spread
    over decades), which keeps the cut off the corrected scores and may leave one outlier wrong
    rather than squeeze the cut beside it. The cut makes at most ``EXTRA_ERRORS`` more errors than
    the fewest, the least smoothed ones among those, and among cuts within ``TOLERANCE`` of that,
    the one nearest ``default``. A label always or never present has no gap: ``_fewest_errors``.
    A label with a broken (non-finite) score keeps ``default``. Labels are fitted together, a block
    at a time, so that no array holds more than ``CELLS`` cells."""
    cuts = np.full(scores.shape[1], float(default))
    finite = np.isfinite(scores).all(axis=0)
    mixed = finite & truth.any(axis=0) & ~truth.all(axis=0)
    block = max(1, CELLS // (len(scores) + GRID + 2))  # [cuts, labels] arrays
    for rule, columns in ((_fewest_errors, np.flatnonzero(finite & ~mixed)), (_inside_gap, np.flatnonzero(mixed))):
        for i in range(0, len(columns), block):
            part = columns[i : i + block]
            cuts[part] = rule(scores[:, part], truth[:, part], default)
    return cuts


def _candidate_cuts(values: np.ndarray, first: float, extra: Sequence[np.ndarray]) -> np.ndarray:
    """[C, L] cuts: ``first``, the midpoints between each column's distinct ``values`` (NaN where
    two are equal), then the rows of ``extra``."""
    ordered = np.sort(values, axis=0)
    midpoints = np.where(ordered[1:] > ordered[:-1], (ordered[:-1] + ordered[1:]) / 2, np.nan)
    return np.concatenate([np.full((1, values.shape[1]), first), midpoints, *extra])


def _nearest(cuts: np.ndarray, allowed: np.ndarray, target: float) -> np.ndarray:
    """[L]: per column, the allowed cut nearest ``target`` (the first of ties)."""
    distance = np.where(allowed, np.abs(cuts - target), np.inf)
    return cuts[distance.argmin(axis=0), np.arange(cuts.shape[1])]


def _fewest_errors(scores: np.ndarray, truth: np.ndarray, default: float) -> np.ndarray:
    """[L]: the cuts that classify most of each column of ``scores`` right, the one nearest
    ``default`` among ties (a label never present in the corrections keeps ``default`` if no
    correction scored above it, else its cut goes just over the highest one: the model was wrong
    on each of them)."""
    low, high = scores.min(axis=0, keepdims=True) - 1e-6, scores.max(axis=0, keepdims=True) + 1e-6
    cuts = _candidate_cuts(scores, default, [low, high])
    errors = _errors(scores, truth, cuts)
    return _nearest(cuts, errors == errors.min(axis=0), default)


def _errors(values: np.ndarray, truth: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """[C, L]: how many tasks each cut classifies wrongly (a task holds the label when its value is
    at least the cut); a NaN cut (no cut) more than the worst cut, with ``EXTRA_ERRORS`` to spare."""
    errors = _below(values, truth, cuts) + (~truth).sum(axis=0) - _below(values, ~truth, cuts)
    errors[np.isnan(cuts)] = len(values) + EXTRA_ERRORS + 1
    return errors


def _below(values: np.ndarray, where: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """[C, L]: how many of each column's ``values`` [n, L] marked in ``where`` lie below each cut,
    by binary search (torch's searchsorted takes a sorted row per label; NumPy's one array)."""
    kept = np.sort(np.where(where, values.astype(np.float64), np.inf), axis=0)
    return torch.searchsorted(torch.from_numpy(kept.T.copy()), torch.from_numpy(cuts.T.copy())).numpy().T


def _inside_gap(scores: np.ndarray, truth: np.ndarray, default: float) -> np.ndarray:
    """[L]: ``best_thresholds`` of labels both present and absent in the corrections."""
    z, centre = _logit(scores), float(_logit(np.array(default)))
    cuts = _candidate_cuts(z, centre, [np.linspace(z.min(axis=0) - 2, z.max(axis=0) + 2, GRID)])
    errors = _errors(z, truth, cuts)
    allowed = errors <= errors.min(axis=0) + EXTRA_ERRORS
    smoothed = np.full(cuts.shape, np.inf)  # computed only where it can matter: the allowed cuts
    pairs = np.nonzero(allowed)
    step = max(1, CELLS // len(z))
    for i in range(0, len(pairs[0]), step):
        row, column = pairs[0][i : i + step], pairs[1][i : i + step]
        above = (z[:, column].T - cuts[row, column][:, None]) / SOFTNESS  # [pairs, n] each score over its cut
        smoothed[row, column] = _normal_cdf(np.where(truth[:, column].T, -above, above)).sum(1)
    chosen = _nearest(cuts, smoothed <= smoothed.min(axis=0) + TOLERANCE, centre)
    return 1 / (1 + np.exp(-chosen))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(x)).numpy()


def fit(scores: Tensor, embeddings: Tensor, truth: np.ndarray, names: Sequence[str], default: float,
        tag_scores: str = "tagclip", should_stop: ShouldStop | None = None) -> Fitted:  # fmt: skip
    """The blend and thresholds that get the most tag sets right out of fold; ``scores`` are of the
    kind ``tag_scores`` (TAG_SCORES).

    Each blend is judged on tasks neither its thresholds nor its cache saw (``FOLDS``-fold), and a
    cache is kept only when it gets ``cache_margin(n)`` more tag sets right than thresholds alone
    and its wins outnumber its losses beyond chance (``cache_wins``), the plainest blend among
    ties. Judged on the tasks it was fitted on, a cache won by chance: on the toy world it raised
    false tags on images with none of the labels; judged out of fold by the margin alone, one of
    the fifteen blends still won by chance on a few projects of ten to fifty corrections
    (docs/algorithms.md section 6). The thresholds served are fitted on every task (the cache
    leave one out). ``should_stop`` is asked between blends (with a thousand labels each takes
    about a second)."""
    target = torch.from_numpy(truth)
    fold = np.arange(len(truth)) % FOLDS
    plain = _right_out_of_fold(scores, embeddings, target, fold, default, 0.0, 0.0)
    best = int(plain.sum()), 0.0, 0.0
    for alpha in (a for a in ALPHAS if a > 0):
        for beta in BETAS:
            check_stop(should_stop, "while fitting the few-shot blend")
            right = _right_out_of_fold(scores, embeddings, target, fold, default, alpha, beta)
            if cache_wins(right, plain) and right.sum() > best[0]:
                best = int(right.sum()), alpha, beta
    right, alpha, beta = best
    blended = leave_one_out(scores, embeddings, target, alpha, beta).numpy()
    thresholds = dict(zip(names, best_thresholds(blended, truth, default).tolist(), strict=True))
    adapter = TipAdapter(embeddings.float(), target.float(), tuple(names), alpha, beta) if alpha else None
    return Fitted(FewShot(thresholds, adapter, tag_scores=tag_scores), right / len(truth))


def cache_margin(tasks: int) -> int:
    """How many more tag sets, of ``tasks``, a cache must get right out of fold to be kept."""
    return max(CACHE_MARGIN, math.ceil(CACHE_MARGIN_SHARE * tasks))


def cache_wins(cache: np.ndarray, plain: np.ndarray) -> bool:
    """Whether a cache that gets the tag sets ``cache`` right (out of fold, [n] booleans) is worth
    keeping over thresholds alone (``plain``): ``cache_margin`` more right, and the tasks only it
    gets right outnumber those only thresholds alone get right beyond chance (exact one-sided sign
    test, as McNemar's, at ``CACHE_P``; nominal, as a fold's tasks share their thresholds)."""
    cache, plain = np.asarray(cache, dtype=bool), np.asarray(plain, dtype=bool)
    wins, losses = int((cache & ~plain).sum()), int((plain & ~cache).sum())
    if wins - losses < cache_margin(len(cache)):
        return False
    tail = sum(math.comb(wins + losses, k) for k in range(wins, wins + losses + 1))
    return tail / 2 ** (wins + losses) <= CACHE_P  # exact integers: a float 2 ** n overflows past 1,023


def _right_out_of_fold(scores: Tensor, embeddings: Tensor, target: Tensor, fold: np.ndarray, default: float,
                       alpha: float, beta: float) -> np.ndarray:  # fmt: skip
    """[n] booleans: which tasks' tag sets a blend gets exactly right when its thresholds are
    fitted, and its cache built, on the other folds."""
    right = np.zeros(len(target), dtype=bool)
    for k in np.unique(fold):
        held, rest = torch.from_numpy(fold == k), torch.from_numpy(fold != k)
        if not rest.any():
            continue  # a single task: nothing to fit its thresholds on
        fitted_on = leave_one_out(scores[rest], embeddings[rest], target[rest], alpha, beta).numpy()
        cuts = best_thresholds(fitted_on, target[rest].numpy(), default)
        judged = scores[held].float()
        if alpha > 0:
            cache = TipAdapter(embeddings[rest].float(), target[rest].float(), (), alpha, beta)
            judged = cache.blend(judged, embeddings[held])
        right[fold == k] = ((judged.numpy() >= cuts) == target[held].numpy()).all(axis=1)
    return right


def patch_targets(correction: Correction, names: Sequence[str], grid: tuple[int, int]) -> Tensor:
    """The corrected label at each patch centre of ``grid`` (h, w), flattened: its index in
    ``names``, NO_LABEL, or UNKNOWN (unknown pixels, labels not fitted). A task tagged (or boxed)
    with a label it has no painted region of says nothing of where that label is: its unpainted
    pixels are UNKNOWN, not NO_LABEL."""
    assert correction.mask is not None
    lookup = np.full(256, UNKNOWN, dtype=np.int64)
    painted = correction.mask_labels[:MASK_LABELS]  # a uint8 mask holds no more
    present = np.unique(correction.mask)
    drawn = {painted[k - 1] for k in present.tolist() if 0 < k <= len(painted)}
    said = correction.all_tags | {label for label, _ in correction.boxes}
    lookup[0] = UNKNOWN if (said - drawn) & set(names) else NO_LABEL
    for k, label in enumerate(painted, start=1):
        lookup[k] = names.index(label) if label in names else UNKNOWN
    small = Image.fromarray(correction.mask).resize((grid[1], grid[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(lookup[np.asarray(small)]).flatten()


def _region_sums(samples: Sequence[RegionSample], n_labels: int) -> tuple[Tensor, Tensor]:
    """Per sample, the sum of the dense features of each label's patches and of the no-label ones
    ([n, L + 1, E], the last row no label), and how many patches each sum holds ([n, L + 1])."""
    sums, counts = [], []
    for sample in samples:
        row = torch.where(sample.target == NO_LABEL, n_labels, sample.target)  # UNKNOWN -> row -2, dropped
        kept = sample.target != UNKNOWN
        features = sample.features.float()[kept]
        sums.append(torch.zeros(n_labels + 1, features.shape[1]).index_add_(0, row[kept], features))
        counts.append(torch.zeros(n_labels + 1).index_add_(0, row[kept], torch.ones(len(features))))
    return torch.stack(sums), torch.stack(counts)


def _masks_iou(
    samples: Sequence[RegionSample], sums: Tensor, counts: Tensor, text: Tensor, background: Tensor,
    names: Sequence[str], gamma: float,
) -> float:  # fmt: skip
    """Mean IoU of the patch maps drawn with each sample's labels (the ones it holds, as when its
    tags are right), per image and label as an annotator meets them (a small region counts as
    much as a large one; accepted unchanged is decided image by image), every sample's prototypes
    made from the other samples only and blended as the predictor blends them."""
    n_labels = text.shape[0]
    ious: list[float] = []
    total, total_counts = sums.sum(dim=0), counts.sum(dim=0)
    for i, sample in enumerate(samples):
        present = torch.nonzero(counts[i, :n_labels]).flatten().tolist()
        if not present:
            continue
        rows, competitors = F.normalize(text[present].float(), dim=-1), background.float()
        if gamma > 0:
            others = _prototypes(total - sums[i], total_counts - counts[i], names, gamma, "")
            rows = others.blend([names[label] for label in present], text[present])
            competitors = torch.cat([competitors, others.competitors(competitors.device)])
        best = (torch.cat([rows, competitors]) @ sample.features.float().T).argmax(dim=0)
        known_patch = sample.target != UNKNOWN
        for j, label in enumerate(present):
            predicted, truth = (best == j) & known_patch, sample.target == label
            ious.append(float((predicted & truth).sum() / (predicted | truth).sum()))  # truth: >= 1 patch
    return sum(ious) / len(ious) if ious else 0.0


def fit_prototypes(
    samples: Sequence[RegionSample], text: Tensor, background: Tensor, names: Sequence[str], features: str
) -> tuple[RegionPrototypes | None, dict[float, float]]:
    """The region prototypes of ``names`` (text embeddings ``text`` [L, E], competing with the
    background words' ``background`` [B, E]) when they draw the samples' masks better than text
    alone, each sample left out in turn, and that mean IoU per weight tried (``GAMMAS``); None
    when text alone is as good.
    ``features`` names the dense features the samples hold (``dense_kind``)."""
    if not samples:
        return None, {}
    sums, counts = _region_sums(samples, len(names))
    scores = {gamma: _masks_iou(samples, sums, counts, text, background, names, gamma) for gamma in GAMMAS}
    gamma = max(GAMMAS, key=lambda g: (scores[g], -g))  # the plainest among ties
    return (_summed_prototypes(sums, counts, names, gamma, features) if gamma > 0 else None), scores


def region_prototypes(
    samples: Sequence[RegionSample], names: Sequence[str], gamma: float, features: str
) -> RegionPrototypes | None:
    """The prototypes of ``names`` made from every sample, at weight ``gamma`` (in (0, 1]);
    None when no sample holds a patch of any of them."""
    return _summed_prototypes(*_region_sums(samples, len(names)), names, gamma, features)


def _summed_prototypes(
    sums: Tensor, counts: Tensor, names: Sequence[str], gamma: float, features: str
) -> RegionPrototypes | None:
    """``region_prototypes`` from the samples' ``_region_sums``."""
    total_counts = counts.sum(dim=0)
    if not total_counts[: len(names)].any():
        return None
    return _prototypes(sums.sum(dim=0), total_counts, names, gamma, features)


def _prototypes(sums: Tensor, counts: Tensor, names: Sequence[str], gamma: float, features: str) -> RegionPrototypes:
    """Prototypes from summed features [L + 1, E] and patch counts [L + 1] (the last row no label),
    for the labels and the no-label pixels that have patches."""
    found = [i for i in range(len(names)) if counts[i] > 0]
    background = F.normalize(sums[-1], dim=-1) if counts[-1] > 0 else None
    return RegionPrototypes(tuple(names[i] for i in found), F.normalize(sums[found], dim=-1), background, gamma,
                            tuple(names), features)  # fmt: skip


def fit_adapter(
    predictor: Predictor, corrections: Sequence[Correction], labels: Sequence[ClassLabel],
    mask_names: Sequence[str] = (), should_stop: ShouldStop | None = None,
) -> Fitted:  # fmt: skip
    """Score and embed ``corrections`` with ``predictor`` (before any adapter of its own) and fit;
    with labels that masks hold (``mask_names``) and no ZegCLIP head, also the region prototypes.
    ``should_stop`` is asked between these stages and between the fit's blends."""
    prepared = list(predictor.prepare([c.image for c in corrections]))
    with torch.inference_mode():
        scores, embeddings = predictor.label_scores(prepared, labels)
    check_stop(should_stop, "after scoring the corrections")
    names = [label.name for label in labels]
    fitted = fit(scores, embeddings, presence(corrections, names), names, predictor.settings.tag_min_score,
                 predictor.settings.tag_scores, should_stop)  # fmt: skip
    painted = [label for label in labels if label.name in mask_names]
    with_masks = [i for i, c in enumerate(corrections) if c.mask is not None][-REGION_SAMPLES:]
    if predictor.head is not None or not painted or not with_masks:
        return fitted  # a ZegCLIP head draws this version's masks, or there is nothing to fit
    check_stop(should_stop, "before the region prototypes")
    region_names = [label.name for label in painted]
    features = predictor.region_features([prepared[i] for i in with_masks])
    samples = [RegionSample(f, patch_targets(corrections[i], region_names, grid))
               for i, (f, grid) in zip(with_masks, features, strict=True)]  # fmt: skip
    text, background = predictor.mask_text(labels, painted)
    prototypes, region_miou = fit_prototypes(samples, text, background, region_names, predictor.dense_kind)
    return dataclasses.replace(
        fitted, few_shot=dataclasses.replace(fitted.few_shot, prototypes=prototypes), region_miou=region_miou
    )


def fitted_config(fitted: Fitted) -> dict[str, Any]:
    """What a version's config records of its few-shot fit (in its ``meta.json``)."""
    adapter, prototypes = fitted.few_shot.adapter, fitted.few_shot.prototypes
    return {
        "adapter": {"alpha": adapter.alpha, "beta": adapter.beta, "cache": len(adapter.keys)} if adapter else None,
        "thresholds": dict(fitted.few_shot.thresholds),
        "tag_scores": fitted.few_shot.tag_scores,
        "regions": {
            "gamma": prototypes.gamma if prototypes else 0.0,
            "labels": list(prototypes.labels) if prototypes else [],
            "features": prototypes.features if prototypes else None,
            "left_out_miou": {str(gamma): round(miou, 4) for gamma, miou in fitted.region_miou.items()},
        } if fitted.region_miou else None,
    }  # fmt: skip


def run_adaptation(
    active: Predictor,
    registry: Registry,
    job: TrainJob,
    progress: Callable[[str, int, int, float | None], None],
    should_stop: ShouldStop,
    collect: Callable[..., list[Correction]] = pull_corrections,
) -> dict[str, Any]:
    """Fit, evaluate, save and maybe promote; returns the summary the job stores as its result."""
    active = active.for_project(job.project_settings)  # fitted as the project is served
    settings = active.settings
    started = time.perf_counter()
    progress("collecting corrections", 0, 0, None)
    limit = settings.adapt_max_corrections  # read, decoded and fetched every few corrections: bounded
    corrections = collect(settings, job.project, job.image_key, job.choices, job.brushes, job.regions, limit=limit)
    corrections = newest(corrections, limit)
    names = mask_labels(job.brushes, job.regions)
    if len(corrections) >= settings.adapt_min_corrections:  # else no image is worth fetching
        corrections = fetch_images(active, corrections, with_masks=bool(names), should_stop=should_stop,
                                   seconds=FETCH_SHARE * settings.job_timeout)  # fmt: skip
    if len(corrections) < settings.adapt_min_corrections:
        reason = (f"{len(corrections)} usable corrections; "
                  f"the few-shot learner starts at {settings.adapt_min_corrections}")  # fmt: skip
        log.info("project %s: not adapting: %s", job.project, reason)
        return {"status": "skipped", "reason": reason, "corrections": len(corrections)}
    parts = split(corrections, settings.train_holdout)

    check_stop(should_stop, "before fitting")
    progress("fitting", 0, 0, None)
    fitted = fit_adapter(active, parts.train, project_labels(job), names, should_stop)
    candidate = active.with_few_shot(fitted.few_shot)

    check_stop(should_stop, "before evaluating")
    progress("evaluating", 0, 0, None)
    scores, promoted, reason = judge(candidate, active, parts.held_out, job, settings.promotion_margin)
    if promoted and not better(scores["candidate"], scores["active"]):
        # Every promotion makes Label Studio predict the project's tasks again: not for a tie.
        promoted, reason = False, "no better than the active version on the held-out corrections"

    source = None
    if job.model_version != registry.base_version:  # a trained or fitted version: its files carry over
        info = registry.get(job.project, job.model_version)
        source = registry.version_dir(job.project, info.number)

    def write(directory) -> None:
        carry_over(source, directory)
        write_adapter(directory, fitted.few_shot)

    check_stop(should_stop, "before saving")
    info = registry.add(
        job.project,
        write,
        trained_on=[c.task_id for c in parts.train],
        held_out=[c.task_id for c in parts.held_out],
        metrics={**scores, "fit_exact": fitted.exact},
        config={
            "from_version": job.model_version,
            "trigger": job.trigger,
            "learner": "few-shot",
            **fitted_config(fitted),
        },
        promoted=promoted,
        reason=reason,
    )
    if promoted and not registry.promote(job.project, info.version, job.model_version, exact=True):
        promoted, reason = False, "another version was promoted while this one was fitted; kept as a candidate"
        info = dataclasses.replace(info, promoted=False, reason=reason)
        registry.save(info)
    seconds = round(time.perf_counter() - started, 1)
    log.info("project %s: few-shot version %s %s (%s) in %.1f s", job.project, info.version,
             "promoted" if promoted else "kept as candidate", reason, seconds)  # fmt: skip
    return {
        "status": "promoted" if promoted else "rejected",
        "version": info.version,
        "reason": reason,
        "metrics": scores,
        "corrections": len(corrections),
        "seconds": seconds,
    }
