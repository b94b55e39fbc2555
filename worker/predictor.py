"""The predict pipeline: fetch and decode task images, run the models in batches, and turn their
scores into tags and masks."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from torch import Tensor

from backend.errors import ImageError
from backend.jobs import (
    BrushControl,
    ChoicesControl,
    ClassLabel,
    ControlTags,
    ImageTask,
    MaskResult,
    PredictJob,
    PredictResult,
    TaskId,
    TaskResult,
)
from backend.settings import Settings
from worker.fetch import ImageFetcher
from worker.images import decode_for_model
from worker.model import dense, vit
from worker.model.loading import ClipBundle, autocast
from worker.model.preprocess import to_pixels, working_size
from worker.model.selection import select_tags
from worker.model.tagclip import LocalScores, TagCLIPConfig, reidentify, run_trunk, tagclip_head
from worker.model.text import TextEmbedder
from worker.model.zegclip import ZegCLIP

log = logging.getLogger(__name__)

FETCH_THREADS = 8


@dataclass(frozen=True)
class ClassBank:
    """The texts the models score against: the project's labels first, then background words.
    A label that appears in several controls with the same words is one class."""

    synonyms: tuple[tuple[str, ...], ...]
    n_labels: int
    index: dict[tuple[str, ...], int]

    @classmethod
    def build(cls, labels: Iterable[ClassLabel], background: tuple[str, ...]) -> ClassBank:
        texts = list(dict.fromkeys(label.texts for label in labels))
        taken = {text.lower() for group in texts for text in group}
        extra = [(word,) for word in dict.fromkeys(background) if word.lower() not in taken]
        return cls(tuple(texts + extra), len(texts), {group: i for i, group in enumerate(texts)})


@dataclass(frozen=True)
class Prepared:
    """One image ready for the models (made in the fetch threads, so decoding and resizing
    overlap): its pixels at the working size, and the upright size of the full image, at which
    masks are drawn."""

    pixels: Tensor  # [3, H, W], normalised
    size: tuple[int, int]  # (width, height)


def same_size_batches(images: Mapping[int, Prepared], batch_size: int) -> list[list[int]]:
    """The keys of ``images`` in batches of at most ``batch_size`` images of one working size."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in images.items():
        groups[tuple(image.pixels.shape)].append(i)
    return [indices[i : i + batch_size] for indices in groups.values() for i in range(0, len(indices), batch_size)]


@dataclass
class ImageScores:
    """What the models produced for one image."""

    tags: list[float]  # TagCLIP score per label class of the bank
    grid: tuple[int, int]
    dense: Tensor | None = None  # [h*w, E] dense patch embeddings (training-free masks)
    zegclip: Tensor | None = None  # [n_labels, h, w] mask logits of the project's trained head


class Predictor:
    """Holds the warm model and everything reused between jobs (text cache, fetch threads)."""

    def __init__(
        self,
        settings: Settings,
        bundle: ClipBundle,
        fetcher: ImageFetcher | None = None,
        text: TextEmbedder | None = None,
        head: ZegCLIP | None = None,
    ) -> None:
        """``text`` lets versions that share a text tower share its cache; ``head`` is a trained
        version's ZegCLIP head, which then draws the masks."""
        self.settings = settings
        self.bundle = bundle
        self.text = text or TextEmbedder(bundle)
        self.fetcher = fetcher or ImageFetcher(settings)
        self.head = head
        self.config = TagCLIPConfig(
            tag_threshold=settings.tag_threshold, cwr_max_classes=settings.cwr_max_classes or None
        )
        self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="prelabel-fetch")

    def warm_up(self) -> None:
        """Embed the background words now: every job needs them, so no job should pay for them."""
        self.text.words(self.settings.background_words)

    def predict(self, job: PredictJob) -> PredictResult:
        started = time.perf_counter()
        images = list(self._pool.map(self._load, job.tasks))
        fetched = _ms_since(started)
        results, timings = self.run([t.task_id for t in job.tasks], images, job.choices, job.brushes)
        timings = {"fetch_prepare": fetched, **timings, "total": _ms_since(started)}
        return PredictResult(model_version=job.model_version, tasks=tuple(results), timings_ms=timings)

    def prepare(self, images: Sequence[Image.Image]) -> list[Prepared]:
        """Decoded images -> model inputs, on the fetch threads."""
        return list(self._pool.map(lambda image: self.prepare_image(image, image.size), images))

    def run(
        self,
        task_ids: Sequence[TaskId],
        images: Sequence[Prepared | str],
        choices: Sequence[ChoicesControl],
        brushes: Sequence[BrushControl],
    ) -> tuple[list[TaskResult], dict[str, float]]:
        """Tags and masks for prepared images (a string in place of an image is that task's error)."""
        timings: dict[str, float] = {}
        mark = time.perf_counter()
        labels = [label for control in (*choices, *brushes) for label in control.labels]
        bank = ClassBank.build(labels, self.settings.background_words)
        text = self.text.classes(bank.synonyms).to(self.bundle.device)
        timings["text"] = _ms_since(mark)

        mark = time.perf_counter()
        good = {i: image for i, image in enumerate(images) if isinstance(image, Prepared)}
        scores = self._run_models(good, text, bank.n_labels, with_dense=bool(brushes))
        timings["model"] = _ms_since(mark)

        mark = time.perf_counter()
        results = []
        for i, (task_id, image) in enumerate(zip(task_ids, images, strict=True)):
            if not isinstance(image, Prepared):
                results.append(TaskResult(task_id, error=image))
                continue
            answers = tuple(self._answer(control, bank, scores[i]) for control in choices)
            masks = tuple(m for brush in brushes for m in self._masks(brush, bank, text, scores[i], image.size))
            results.append(TaskResult(task_id, answers, masks, *image.size))
        timings["masks"] = _ms_since(mark)
        return results, timings

    def _load(self, task: ImageTask) -> Prepared | str:
        """The task's image ready for the models, or the reason it failed (one bad task never
        fails the batch). Decoded no larger than the working size needs."""
        if task.image_url is None:
            return "The task has no image URL in its data."
        try:
            data = self.fetcher.fetch(task.image_url)
            image, size = decode_for_model(data, self.settings.max_image_pixels, self.settings.image_size)
        except ImageError as e:
            log.warning("task %s: %s", task.task_id, e)
            return str(e)
        return self.prepare_image(image, size)

    def prepare_image(self, image: Image.Image, size: tuple[int, int]) -> Prepared:
        """``image`` (the picture of ``size``, possibly decoded smaller) at its working size."""
        work = working_size(*size, self.settings.image_size, vit.patch_size(self.bundle.visual))
        return Prepared(to_pixels(image, work, self.bundle.mean, self.bundle.std), size)

    def _run_models(
        self, images: dict[int, Prepared], text: Tensor, n_labels: int, with_dense: bool
    ) -> dict[int, ImageScores]:
        """Same-size images share forward passes: one trunk (blocks 0..L-2) feeds both TagCLIP and
        the dense head; then the CWR crops of all images share batches. A project's ZegCLIP head,
        when it has one, replaces the dense head with its own prompted pass."""
        visual = self.bundle.visual
        order: list[int] = []
        local: list[LocalScores] = []
        extras: list[dict[str, Tensor]] = []
        with self._inference():
            for chunk in same_size_batches(images, self.settings.batch_size):
                pixels = torch.stack([images[i].pixels for i in chunk]).to(self.bundle.device)
                trunk = run_trunk(self.bundle, pixels, self.config)
                if self.head is not None and with_dense:
                    logits = self.head(visual, pixels, text[:n_labels])
                    extras += [{"zegclip": image_logits.float()} for image_logits in logits]
                elif with_dense:
                    features = dense.dense_features(visual, trunk.tokens, trunk.grid, self.settings.dense_head)
                    extras += [{"dense": f.float()} for f in features]
                else:
                    extras += [{} for _ in chunk]
                local += tagclip_head(self.bundle, trunk, text, n_labels, self.config)
                order += chunk
            fused = reidentify(self.bundle, local, text, self.config, self.settings.batch_size)
        return {
            i: ImageScores(scores.float().cpu().tolist(), item.grid, **extra)
            for i, scores, item, extra in zip(order, fused, local, extras, strict=True)
        }

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No autograd; bf16 autocast when the bundle computes in bf16 (see ``PRECISION``)."""
        with torch.inference_mode(), autocast(self.bundle):
            yield

    def _answer(self, control: ChoicesControl, bank: ClassBank, scores: ImageScores) -> ControlTags:
        by_label = {label.name: scores.tags[bank.index[label.texts]] for label in control.labels}
        selected, confidence = select_tags(by_label, control.multiple, self.config.tag_threshold)
        return ControlTags(control.from_name, selected, by_label, confidence)

    def _masks(
        self, brush: BrushControl, bank: ClassBank, text: Tensor, scores: ImageScores, size: tuple[int, int]
    ) -> list[MaskResult]:
        """Segment the labels TagCLIP finds in the image, competing with the background words;
        pixels a background word wins stay unlabeled."""
        by_label = {label.name: scores.tags[bank.index[label.texts]] for label in brush.labels}
        found, _ = select_tags(by_label, True, self.config.tag_threshold)
        labels = [label for label in brush.labels if label.name in found]
        rows = [bank.index[label.texts] for label in labels]
        min_area = self.settings.mask_min_area
        with torch.inference_mode():
            if scores.zegclip is not None and self.head is not None:  # sigmoid scores; a floor gives "none"
                floor = self.head.cfg.mask_threshold
                masks = dense.masks_from_logits(scores.zegclip[rows], len(rows), size, min_area, "sigmoid", floor)
            else:  # softmax against the background words, which win "none"
                assert scores.dense is not None, "dense features are computed for jobs with BrushLabels"
                rows += list(range(bank.n_labels, len(bank.synonyms)))
                logits = dense.class_logits(scores.dense, text[rows], scores.grid)
                masks = dense.masks_from_logits(logits, len(labels), size, min_area)
        return [
            MaskResult(brush.from_name, labels[m.index].name, mask2rle(m.mask.astype(np.uint8) * 255), m.score)
            for m in masks
        ]


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)
