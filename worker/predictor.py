"""The predict pipeline: fetch and decode task images, run the models in batches, and turn their
scores into tags and masks."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor

from common.errors import ImageError
from common.jobs import (
    BrushControl,
    ChoicesControl,
    ClassLabel,
    ControlTags,
    ImageTask,
    MaskResult,
    PredictJob,
    PredictResult,
    RegionControl,
    RegionResult,
    TaskId,
    TaskResult,
)
from common.labelstudio.brush import scaled_mask_to_rle
from common.settings import Settings
from worker.fetch import ImageFetcher
from worker.images import PixelBudget, decode_for_model
from worker.model import dense, vit
from worker.model.adapter import FewShot, dense_kind
from worker.model.bundle import ClipBundle, autocast
from worker.model.preprocess import to_pixels, working_size
from worker.model.selection import TagRule, select_tags
from worker.model.tagclip import LocalScores, TagCLIPConfig, global_scores, reidentify, run_trunk, tagclip_head
from worker.model.text import TextEmbedder
from worker.model.zegclip import ZegCLIP
from worker.regions import polygons, rectangles
from worker.vocabulary import ClassBank, distinct_competitors, distractor_words

log = logging.getLogger(__name__)

#: How each region control's results are drawn from a label's mask.
DRAW = {"rectanglelabels": rectangles, "polygonlabels": polygons}


@dataclass(frozen=True)
class Prepared:
    """One image ready for the models (made in the fetch threads, so decoding and resizing
    overlap): its pixels at the working size, and the upright size of the full image, at which
    masks are drawn."""

    pixels: Tensor  # [3, H, W], normalised
    size: tuple[int, int]  # (width, height)


def same_size_batches(images: Iterable[tuple[int, Prepared]], batch_size: int) -> Iterator[list[tuple[int, Prepared]]]:
    """``(index, image)`` pairs in batches of at most ``batch_size`` images of one working size.
    A batch is yielded as soon as it is full, while later images may still be on their way (so
    the model runs while the fetch threads work); the incomplete ones follow at the end."""
    groups: dict[tuple[int, ...], list[tuple[int, Prepared]]] = defaultdict(list)
    for i, image in images:
        group = groups[tuple(image.pixels.shape)]
        group.append((i, image))
        if len(group) == batch_size:
            yield group.copy()
            group.clear()
    yield from (group for group in groups.values() if group)


class Arrivals:
    """A job's images in task order as the fetch threads finish them: every one is kept (a string
    is a task's error), the good ones are passed on with their index, and the time spent waiting
    for them is counted."""

    def __init__(self, images: Iterable[Prepared | str]) -> None:
        self._images = iter(images)
        self.received: list[Prepared | str] = []
        self.waited_ms = 0.0

    def __iter__(self) -> Iterator[tuple[int, Prepared]]:
        while True:
            mark = time.perf_counter()
            image = next(self._images, None)
            self.waited_ms += (time.perf_counter() - mark) * 1000
            if image is None:
                return
            self.received.append(image)
            if isinstance(image, Prepared):
                yield len(self.received) - 1, image


@dataclass
class ImageScores:
    """What the models produced for one image."""

    tags: list[float]  # tag score (``TAG_SCORES``) per label class of the bank
    grid: tuple[int, int]
    dense: Tensor | None = None  # [h*w, E] dense patch embeddings (training-free masks)
    zegclip: Tensor | None = None  # [n_labels, h, w] mask logits of the project's trained head
    embedding: Tensor | None = None  # [E] normalised image embedding (the few-shot adapter's key)


class Predictor:
    """Holds the warm model and everything reused between jobs (text cache, fetch threads)."""

    def __init__(
        self,
        settings: Settings,
        bundle: ClipBundle,
        fetcher: ImageFetcher | None = None,
        text: TextEmbedder | None = None,
        head: ZegCLIP | None = None,
        few_shot: FewShot | None = None,
    ) -> None:
        """``text`` lets versions that share a text tower share its cache; ``head`` is a trained
        version's ZegCLIP head, which then draws the masks; ``few_shot`` is what a version's
        few-shot learner fitted on the project's corrections (thresholds, caches)."""
        self.settings = settings
        self.bundle = bundle
        self.text = text or TextEmbedder(bundle)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.head = head
        self.few_shot = few_shot or FewShot()
        self.config = TagCLIPConfig(cwr_max_classes=settings.cwr_max_classes or None)
        self.tag_fit = self.few_shot.for_tag_scores(settings.tag_scores)  # thresholds and tag cache
        self.rule = TagRule(settings.tag_rule, settings.tag_min_score, settings.tag_threshold,
                            dict(self.tag_fit.thresholds))  # fmt: skip
        self.distractors = distractor_words(settings.distractors)
        threads = settings.fetch_threads or max(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prelabel-fetch")
        self._budget = PixelBudget(2 * settings.max_image_pixels)

    def with_weights(
        self, visual: VisionTransformer, head: ZegCLIP | None, few_shot: FewShot | None = None
    ) -> Predictor:
        """A predictor for a trained version: its own ViT, head and few-shot fit; this one's text
        tower, text cache and fetcher."""
        bundle = dataclasses.replace(self.bundle, visual=visual.to(self.bundle.device))
        head = head.to(self.bundle.device) if head is not None else None
        return Predictor(self.settings, bundle, self.fetcher, self.text, head, few_shot)

    def with_few_shot(self, few_shot: FewShot) -> Predictor:
        """This predictor's weights and head with another few-shot fit."""
        return Predictor(self.settings, self.bundle, self.fetcher, self.text, self.head, few_shot)

    def for_project(self, project_settings: Mapping[str, object]) -> Predictor:
        """This predictor with a project's own settings (Label Studio's extra_params: how tags
        are decided, how masks are drawn), checked again here; the same weights, caches and
        threads. A version's fitted per-label thresholds still win over TAG_MIN_SCORE, if they
        were fitted on the project's TAG_SCORES."""
        overrides = self.settings.project_overrides(dict(project_settings))
        if not overrides:
            return self
        settings = dataclasses.replace(self.settings, **overrides)
        predictor = copy.copy(self)
        predictor.settings = settings
        predictor.config = TagCLIPConfig(cwr_max_classes=settings.cwr_max_classes or None)
        predictor.tag_fit = self.few_shot.for_tag_scores(settings.tag_scores)
        predictor.rule = TagRule(settings.tag_rule, settings.tag_min_score, settings.tag_threshold,
                                 dict(predictor.tag_fit.thresholds))  # fmt: skip
        return predictor

    def warm_up(self) -> None:
        """Embed the background words and distractors now: every job needs them, so no job should
        pay for them (~330 words x 85 prompts: a second on a GPU, a few minutes on a CPU)."""
        self.text.words((*self.settings.background_words, *self.distractors))

    def predict(self, job: PredictJob) -> PredictResult:
        started = time.perf_counter()
        images = self._pool.map(self._load, job.tasks)  # all submitted now; the models take them as they come
        results, timings = self.run([t.task_id for t in job.tasks], images, job.choices, job.brushes, job.regions)
        timings["total"] = _ms_since(started)
        # the version this worker served: the weights' and the project's settings it applied
        return PredictResult(model_version=job.served_version, tasks=tuple(results), timings_ms=timings)

    def prepare(self, images: Sequence[Image.Image]) -> Iterator[Prepared]:
        """Decoded images -> model inputs, made on the fetch threads and yielded in order as they
        are ready (``run`` starts on them before the last one is)."""
        return self._pool.map(lambda image: self.prepare_image(image, image.size), images)

    def run(
        self,
        task_ids: Sequence[TaskId],
        images: Iterable[Prepared | str],
        choices: Sequence[ChoicesControl],
        brushes: Sequence[BrushControl],
        regions: Sequence[RegionControl] = (),
    ) -> tuple[list[TaskResult], dict[str, float]]:
        """Tags, masks, boxes and polygons for prepared images, in task order (a string in place of
        an image is that task's error). ``images`` may still be arriving: full batches run as soon
        as they are ready. Timings: ``waiting_for_images`` is the time the models had nothing to
        do, ``model`` the rest."""
        timings: dict[str, float] = {}
        mark = time.perf_counter()
        labels = [label for control in (*choices, *brushes, *regions) for label in control.labels]
        bank, text, mask_rows = self._vocabulary(labels)
        timings["text"] = _ms_since(mark)

        mark = time.perf_counter()
        arrivals = Arrivals(images)
        scores = self._run_models(arrivals, text, bank.n_labels, bool(brushes or regions),
                                  self.tag_fit.adapter is not None)  # fmt: skip
        timings["waiting_for_images"] = round(arrivals.waited_ms, 1)
        timings["model"] = round(_ms_since(mark) - arrivals.waited_ms, 1)
        if len(arrivals.received) != len(task_ids):
            raise ValueError(f"{len(task_ids)} tasks but {len(arrivals.received)} images")

        def finish(i: int) -> TaskResult:
            image = arrivals.received[i]
            if not isinstance(image, Prepared):
                return TaskResult(task_ids[i], error=image)
            answers = tuple(self._answer(control, bank, scores[i]) for control in choices)
            segmented: dict[tuple[ClassLabel, ...], list[tuple[ClassLabel, dense.Mask]]] = {}

            def masks_of(labels: tuple[ClassLabel, ...]) -> list[tuple[ClassLabel, dense.Mask]]:
                """Controls with the same labels share one segmentation of the image."""
                if labels not in segmented:
                    segmented[labels] = self._masks(labels, bank, text[mask_rows], scores[i], image.size, image.pixels)
                return segmented[labels]

            masks = tuple(
                MaskResult(brush.from_name, label.name, scaled_mask_to_rle(m.region, m.size), m.score)
                for brush in brushes
                for label, m in masks_of(brush.labels)
            )
            drawn = tuple(
                RegionResult(control.from_name, label.name, control.type, value, m.score)
                for control in regions
                for label, m in masks_of(control.labels)
                for value in DRAW[control.type](m.region, self.settings.mask_min_area)
            )
            return TaskResult(task_ids[i], answers, masks, *image.size, regions=drawn)

        mark = time.perf_counter()
        # Masks and their RLE are CPU work per image (upsampling, connected regions, encoding):
        # spread over the fetch threads, idle by now, so a GPU worker is not held up by one core.
        results = list(self._pool.map(finish, range(len(task_ids))))
        timings["masks"] = _ms_since(mark)
        return results, timings

    def _load(self, task: ImageTask) -> Prepared | str:
        """The task's image ready for the models, or the reason it failed (one bad task never
        fails the batch). Decoded no larger than the working size needs."""
        if task.image_url is None:
            return "The task has no image URL in its data."
        try:
            data = self.fetcher.fetch(task.image_url, task.task_id)
            image, size = decode_for_model(data, self.settings.max_image_pixels, self.settings.image_size, self._budget)
            return self.prepare_image(image, size)
        except ImageError as e:
            log.warning("task %s: %s", task.task_id, e)
            return str(e)
        except Exception as e:  # a bug or an input nobody foresaw: this task fails, never the batch
            log.exception("task %s: unexpected error preparing its image", task.task_id)
            return f"Unexpected error preparing the image: {type(e).__name__}"

    def prepare_image(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        """``image`` (the picture of ``size``, possibly decoded smaller) at its working size."""
        work = working_size(*size, self.settings.image_size, vit.patch_size(self.bundle.visual))
        return Prepared(to_pixels(image, work, self.bundle.mean, self.bundle.std), size)

    def _vocabulary(self, labels: Sequence[ClassLabel]) -> tuple[ClassBank, Tensor, list[int]]:
        """The labels and their distinct competitors: the bank, its text embeddings on the device,
        and the rows masks compete with (the labels' and the background words')."""
        bank = ClassBank.build(labels, self.settings.background_words, self.distractors)
        text = self.text.classes(bank.synonyms)
        kept = distinct_competitors(text, bank.n_labels)
        return bank, text[kept].to(self.bundle.device), bank.mask_rows(kept)

    def label_scores(self, images: Sequence[Prepared], labels: Sequence[ClassLabel]) -> tuple[Tensor, Tensor]:
        """[n, L] tag scores of ``labels`` (``TAG_SCORES``, before any adapter) and [n, E] image embeddings:
        what the few-shot learner fits on."""
        bank, text, _ = self._vocabulary(labels)
        scores = self._run_models(enumerate(images), text, bank.n_labels, False, True)
        rows = [bank.index[label.texts] for label in labels]
        tags = torch.tensor([[scores[i].tags[r] for r in rows] for i in range(len(images))]).reshape(len(images), -1)
        return tags, torch.stack([scores[i].embedding for i in range(len(images))])  # type: ignore[misc]

    def _run_models(
        self, images: Iterable[tuple[int, Prepared]], text: Tensor, n_labels: int, with_dense: bool,
        with_embedding: bool,
    ) -> dict[int, ImageScores]:  # fmt: skip
        """Same-size images share forward passes: one trunk (blocks 0..L-2) feeds both the tag
        scores and the dense head; then the CWR crops of all images share batches. A project's
        ZegCLIP head, when it has one, replaces the dense head with its own prompted pass.
        ``with_embedding`` also finishes the trunk's plain last block for the image embedding,
        which ``TAG_SCORES=global`` scores tags with instead of TagCLIP's local route and CWR."""
        visual = self.bundle.visual
        tagclip = self.settings.tag_scores == "tagclip"
        order: list[int] = []
        local: list[LocalScores] = []
        tags: list[Tensor] = []
        grids: list[tuple[int, int]] = []
        extras: list[dict[str, Tensor]] = []
        with self._inference():
            for batch in same_size_batches(images, self.settings.batch_size):
                chunk = [i for i, _ in batch]
                pixels = torch.stack([image.pixels for _, image in batch]).to(self.bundle.device)
                # TagCLIP's trunk also gathers its attention statistics; the global route needs none
                trunk = run_trunk(self.bundle, pixels, self.config) if tagclip else None
                tokens = trunk.tokens if trunk is not None else vit.trunk(visual, pixels)
                if self.head is not None and with_dense:
                    logits = self.head(visual, pixels, text[:n_labels])
                    extras += [{"zegclip": image_logits.float()} for image_logits in logits]
                elif with_dense:
                    extras += [{"dense": f.float()} for f in self._dense(pixels, tokens)]
                else:
                    extras += [{} for _ in chunk]
                if with_embedding or trunk is None:
                    last = visual.transformer.resblocks[-1]
                    embedded = vit.project(visual, vit.block_forward(last, tokens))[:, 0].float()
                    for extra, embedding in zip(extras[-len(chunk) :], embedded.cpu(), strict=True):
                        extra["embedding"] = embedding
                    if trunk is None:
                        tags += list(global_scores(embedded, text, n_labels, self.bundle.logit_scale))
                if trunk is not None:
                    local += tagclip_head(self.bundle, trunk, text, n_labels, self.config)
                grids += [vit.patch_grid(visual, pixels)] * len(chunk)
                order += chunk
            if tagclip:
                tags = reidentify(self.bundle, local, text, self.config, self.settings.batch_size)
        return {
            i: ImageScores(scores.float().cpu().tolist(), grid, **extra)
            for i, scores, grid, extra in zip(order, tags, grids, extras, strict=True)
        }

    def _dense(self, pixels: Tensor, tokens: Tensor | None = None) -> Tensor:
        """[B, h*w, E] training-free dense features (``DENSE_HEAD``, sliding windows or the whole
        image on the trunk's ``tokens``, computed here when not given)."""
        visual, head = self.bundle.visual, self.settings.dense_head
        if self.settings.dense_sliding:
            return dense.sliding_features(visual, pixels, head, self.settings.batch_size)
        grid = vit.patch_grid(visual, pixels)
        if tokens is None:
            tokens = vit.trunk(visual, pixels)
        return dense.dense_features(visual, tokens, grid, head)

    @property
    def dense_kind(self) -> str:
        """Which dense features training-free masks are drawn from (``DENSE_HEAD``, sliding or not)."""
        return dense_kind(self.settings.dense_head, self.settings.dense_sliding)

    def region_features(self, images: Sequence[Prepared]) -> list[tuple[Tensor, tuple[int, int]]]:
        """Each image's [h*w, E] training-free dense features (on the CPU) and patch grid, as masks
        are drawn from them: what the few-shot learner's region prototypes are made of."""
        out: dict[int, tuple[Tensor, tuple[int, int]]] = {}
        with self._inference():
            for batch in same_size_batches(enumerate(images), self.settings.batch_size):
                pixels = torch.stack([image.pixels for _, image in batch]).to(self.bundle.device)
                grid = vit.patch_grid(self.bundle.visual, pixels)
                for (i, _), features in zip(batch, self._dense(pixels), strict=True):
                    out[i] = (features.float().cpu(), grid)
        return [out[i] for i in range(len(images))]

    def mask_text(self, labels: Sequence[ClassLabel], painted: Sequence[ClassLabel]) -> tuple[Tensor, Tensor]:
        """[P, E] text embeddings of the ``painted`` labels and [B, E] of the background words their
        training-free masks compete with in a job of ``labels`` (on the CPU)."""
        bank, text, mask_rows = self._vocabulary(labels)
        rows = [bank.index[label.texts] for label in painted]
        return text[rows].float().cpu(), text[mask_rows[bank.n_labels :]].float().cpu()

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No autograd; bf16 autocast when the bundle computes in bf16 (see ``PRECISION``)."""
        with torch.inference_mode(), autocast(self.bundle):
            yield

    def _label_scores(self, labels: Sequence[ClassLabel], bank: ClassBank, scores: ImageScores) -> dict[str, float]:
        """Each label's tag score, through the version's few-shot adapter when it has one."""
        by_label = {label.name: scores.tags[bank.index[label.texts]] for label in labels}
        if self.tag_fit.adapter is not None and scores.embedding is not None:
            return self.tag_fit.adapter.adjust(by_label, scores.embedding)
        return by_label

    def _answer(self, control: ChoicesControl, bank: ClassBank, scores: ImageScores) -> ControlTags:
        by_label = self._label_scores(control.labels, bank, scores)
        selected, confidence = select_tags(by_label, control.multiple, self.rule)
        return ControlTags(control.from_name, selected, by_label, confidence)

    def _masks(
        self, control_labels: Sequence[ClassLabel], bank: ClassBank, text: Tensor, scores: ImageScores,
        size: tuple[int, int], pixels: Tensor,
    ) -> list[tuple[ClassLabel, dense.Mask]]:  # fmt: skip
        """Segment the labels of a control that the tag rule finds in the image (decided against
        every competitor), competing with the background words in ``text`` (the labels' rows, then
        theirs); pixels a background word wins stay unlabeled. The scores are refined along the
        edges of ``pixels`` (the image the model saw; PAMR) with DENSE_PAMR=true, and with auto
        where the project's region prototypes draw the masks."""
        found, _ = select_tags(self._label_scores(control_labels, bank, scores), True, self.rule)
        labels = [label for label in control_labels if label.name in found]
        if not labels:
            return []
        rows = [bank.index[label.texts] for label in labels]
        min_area = self.settings.mask_min_area
        with torch.inference_mode():
            if scores.zegclip is not None and self.head is not None:  # sigmoid scores; a floor gives "none"
                floor = self.head.cfg.mask_threshold
                masks = dense.masks_from_logits(scores.zegclip[rows], len(rows), size, min_area, "sigmoid", floor)
            else:  # softmax against the background words, which win "none"
                assert scores.dense is not None, "dense features are computed for jobs with masks, boxes or polygons"
                classes = torch.cat([text[rows], text[bank.n_labels :]])
                regions = self.few_shot.prototypes
                learnt = regions is not None and regions.serves(self.dense_kind, [lab.name for lab in control_labels])
                if learnt:
                    label_text = regions.blend([label.name for label in labels], text[rows]).to(text.dtype)
                    # corrected "no label" pixels compete beside the background words
                    classes = torch.cat(
                        [label_text, text[bank.n_labels :], regions.competitors(text.device).to(text.dtype)]
                    )
                logits = dense.class_logits(scores.dense, classes, scores.grid)
                mode = self.settings.dense_pamr
                refine = mode == "true" or (mode == "auto" and learnt)
                masks = dense.masks_from_logits(logits, len(labels), size, min_area, image=pixels if refine else None)
        return [(labels[m.index], m) for m in masks]


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
