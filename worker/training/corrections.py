"""Human corrections, read from Label Studio (the source of truth) before every training run.

Webhooks can be missed and annotations deleted, so training never trusts what it heard: it
pulls the project's current annotations through label-studio-sdk, takes the latest submitted
(not cancelled) annotation of each task, and turns its results into tags and masks.
"""

from __future__ import annotations

import heapq
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from rq.timeouts import BaseTimeoutException

from common.errors import AnnotationError, ImageError
from common.jobs import BrushControl, ChoicesControl, RegionControl, TaskId
from common.labelstudio.annotations import check_annotation, chosen, image_url, latest_annotation
from common.labelstudio.annotations import regions as regions_of
from common.labelstudio.brush import draw_scaled, original_size, region_size, rle_to_mask
from common.labelstudio.client import label_studio_client
from common.labelstudio.regions import box_extent, draw_outline, region_labels, region_outline
from common.projects import project_id
from common.settings import Settings
from worker.images import decode_for_model
from worker.predictor import Predictor
from worker.training.loop import ShouldStop, check_stop

log = logging.getLogger(__name__)

#: The share of its job's time limit a run may spend fetching images: a slow image host costs the
#: run the images not fetched in time, not the run itself (its job timing out before it learns).
FETCH_SHARE = 0.5
#: A correction's mask is uint8: 0 no label, 1-254 its labels, 255 unknown (also the pixels of a
#: label past the 254th, which it cannot hold: such labels teach masks nothing).
MASK_LABELS, UNKNOWN_PIXEL = 254, 255


@dataclass
class Correction:
    """One task as an annotator left it, at training size (short side at most ``IMAGE_SIZE``, so
    a project of phone photos fits in memory). ``mask`` (uint8) holds 0 where no label applies,
    k for ``mask_labels[k - 1]`` (up to ``MASK_LABELS``) and ``UNKNOWN_PIXEL`` where nothing is
    known, from brush regions and polygons; it is None until known (a
    project with BrushLabels or PolygonLabels whose annotation has no region gets an all-zero mask
    once the image size is known). ``boxes`` are weak labels: (label, (x0, y0, x1, y1) as fractions
    of the image), where the label is somewhere in the box. ``size`` is the (width, height) the
    regions were drawn at: the photo's upright size."""

    task_id: TaskId
    image_url: str | None
    tags: dict[str, set[str]] = field(default_factory=dict)  # Choices from_name -> labels
    mask: np.ndarray | None = None
    mask_labels: tuple[str, ...] = ()
    image: Image.Image | None = None  # filled in when the image is fetched
    size: tuple[int, int] | None = None
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)

    @property
    def all_tags(self) -> set[str]:
        return set().union(*self.tags.values()) if self.tags else set()


def training_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) with the short side at most ``image_size``, the aspect kept."""
    scale = min(1.0, image_size / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def from_annotation(
    task_id: TaskId,
    image_url: str | None,
    result: Sequence[dict],
    choices: Sequence[ChoicesControl],
    brushes: Sequence[BrushControl],
    max_pixels: int,
    image_size: int,
    regions: Sequence[RegionControl] = (),
) -> Correction:
    """Read one annotation's ``result`` list: Choices into tags, BrushLabels RLE and PolygonLabels
    into one label map at training size (later regions win where regions overlap, as they are
    drawn on top in the editor), RectangleLabels into weak box labels.

    Raises:
        AnnotationError: a region is over ``max_pixels``, its RLE is corrupt or its numbers are not.
    """
    choice_names = {c.from_name for c in choices}
    painted = {b.from_name: "brushlabels" for b in brushes}
    painted |= {r.from_name: r.type for r in regions if r.type == "polygonlabels"}
    boxed = {r.from_name: {label.name for label in r.labels} for r in regions if r.type == "rectanglelabels"}
    labels = mask_labels(brushes, regions)
    values = {label: k if k <= MASK_LABELS else UNKNOWN_PIXEL for k, label in enumerate(labels, start=1)}
    tags = chosen(result)
    correction = Correction(task_id, image_url, tags={name: tags.get(name, set()) for name in choice_names},
                            mask_labels=labels[:MASK_LABELS])  # fmt: skip
    for item in regions_of(result, ("rectanglelabels", "brushlabels", "polygonlabels")):
        kind, name = item.get("type"), item.get("from_name")
        if kind == "rectanglelabels" and name in boxed:
            box = box_extent(item)
            correction.boxes += [(label, box) for label in region_labels(item) if label in boxed[name]]
            continue
        if painted.get(name) != kind:
            continue
        size = region_size(item, max_pixels) if kind == "brushlabels" else original_size(item, max_pixels)
        if correction.size is None:
            correction.size = size
            width, height = training_size(*size, image_size)
            correction.mask = np.zeros((height, width), dtype=np.uint8)
        if size != correction.size:
            log.warning("task %s: regions drawn at different image sizes; skipping one", task_id)
            continue
        assert correction.mask is not None
        work = (correction.mask.shape[1], correction.mask.shape[0])
        if kind == "brushlabels":
            small = draw_scaled(rle_to_mask(item["value"]["rle"], *size), work)
        else:
            small = draw_outline(region_outline(item), work)
        for label in region_labels(item):
            if label in values:
                correction.mask[small] = values[label]
    correction.boxes = list(dict.fromkeys(correction.boxes))  # each (label, box) once, in order
    return correction


def mask_labels(brushes: Sequence[BrushControl], regions: Sequence[RegionControl]) -> tuple[str, ...]:
    """The labels a correction's mask can hold: those of BrushLabels and PolygonLabels controls."""
    painted = [*brushes, *(r for r in regions if r.type == "polygonlabels")]
    return tuple(dict.fromkeys(label.name for control in painted for label in control.labels))


def pull_corrections(
    settings: Settings,
    project: str,
    image_key: str,
    choices: Sequence[ChoicesControl],
    brushes: Sequence[BrushControl],
    regions: Sequence[RegionControl] = (),
    limit: int | None = None,
) -> list[Correction]:
    """Every annotated task of ``project`` (the ``limit`` newest, by id, when given: only those
    are kept while the pages stream in, and decoded), from Label Studio's API, latest annotation each."""
    corrections = []
    with label_studio_client(settings, "Training (it reads the corrections from Label Studio)") as client:
        # resolve_uri=False: cloud storage URIs as stored (s3://...), which the fetcher resolves itself
        pages = client.tasks.list(project=project_id(project), fields="all", only_annotated=True, resolve_uri=False)
        tasks = (task if isinstance(task, dict) else task.model_dump() for task in pages)
        if limit is not None:
            tasks = iter(sorted(heapq.nlargest(limit, tasks, key=_task_order), key=_task_order))
        for task in tasks:
            annotation = latest_annotation(task.get("annotations") or [])
            if annotation is None:
                continue
            url = image_url(task, image_key)
            try:
                check_annotation(annotation, settings.max_image_pixels)  # as the webhook does: Label Studio does not
                corrections.append(from_annotation(task["id"], url, annotation.get("result") or [], choices,
                                                   brushes, settings.max_image_pixels, settings.image_size,
                                                   regions))  # fmt: skip
            except AnnotationError as e:
                log.warning("task %s left out of training: %s", task["id"], e)
            except BaseTimeoutException:
                raise  # the job's time is up: not this task's fault
            except Exception:  # an input nobody foresaw costs this task, not the run
                log.exception("task %s left out of training: unexpected error reading its annotation", task["id"])
    log.info("project %s: %d corrected tasks in Label Studio", project, len(corrections))
    return corrections


def _task_order(task: dict) -> tuple[int, int, str]:
    task_id = task.get("id")
    return (0, task_id, "") if isinstance(task_id, int) else (1, 0, str(task_id))


@dataclass(frozen=True)
class Split:
    train: list[Correction]
    held_out: list[Correction]


def split(corrections: list[Correction], fraction: float) -> Split:
    """About ``fraction`` of the tasks, chosen by a hash of their id, go to the held-out set (at
    least one, once there are two): a task stays on its side whatever other tasks come and go, so
    a version is never measured on the tasks the active one learned from."""
    ordered = sorted(corrections, key=lambda c: str(c.task_id))
    if len(ordered) < 2:
        return Split(ordered, [])
    every = max(2, round(1 / fraction))
    held = [c for c in ordered if zlib.crc32(str(c.task_id).encode()) % every == 0] or [ordered[-1]]
    if len(held) == len(ordered):
        held = held[-1:]
    held_ids = {id(c) for c in held}
    return Split([c for c in ordered if id(c) not in held_ids], held)


def fetch_images(
    predictor: Predictor, corrections: list[Correction], with_masks: bool, should_stop: ShouldStop | None = None,
    seconds: float | None = None,
) -> list[Correction]:  # fmt: skip
    """Attach decoded images at training size (short side at most IMAGE_SIZE: a project of phone
    photos stays a few hundred kB per task); drop tasks whose image cannot be had (logged); a
    project with BrushLabels or PolygonLabels reads "no region" as "nothing to label here" (and a
    corrected box's uncovered pixels as unknown). After ``seconds`` (when given) no more images
    are fetched: the run goes on with those it has (logged), the newest, as they are fetched first."""
    settings = predictor.settings
    kept = []
    started = time.monotonic()
    for done, correction in enumerate(reversed(corrections)):  # newest first
        check_stop(should_stop, "while fetching images")
        if seconds is not None and time.monotonic() - started >= seconds:
            log.warning("fetching stopped after %.0f s, its share of the job's time limit: %d of %d corrections "
                        "fetched (the newest), %d usable; the older ones are left out of this run",
                        time.monotonic() - started, done, len(corrections), len(kept))  # fmt: skip
            break
        if correction.image_url is None:
            continue
        try:
            data = predictor.fetcher.fetch(correction.image_url, correction.task_id)
            image, upright = decode_for_model(data, settings.max_image_pixels, settings.image_size)
        except ImageError as e:
            log.warning("task %s left out of training: %s", correction.task_id, e)
            continue
        except BaseTimeoutException:
            raise  # the job's time is up: not this task's fault
        except Exception:  # an input nobody foresaw costs this task, not the run
            log.exception("task %s left out of training: unexpected error fetching its image", correction.task_id)
            continue
        drawn_at = correction.size
        if drawn_at is None and correction.mask is not None:
            drawn_at = (correction.mask.shape[1], correction.mask.shape[0])
        if drawn_at is not None and drawn_at != upright:
            log.warning("task %s left out of training: mask and image sizes differ", correction.task_id)
            continue
        work = training_size(*upright, settings.image_size)
        correction.image = image if image.size == work else image.resize(work, Image.Resampling.BICUBIC)
        correction.size = upright
        if correction.mask is not None and correction.mask.shape != (work[1], work[0]):
            correction.mask = draw_scaled(correction.mask, work)
        if with_masks and correction.mask is None:
            correction.mask = np.zeros((work[1], work[0]), dtype=np.uint8)
        if correction.mask is not None:
            mark_boxes_unknown(correction.mask, correction.boxes)
        kept.append(correction)
    return kept[::-1]


def mark_boxes_unknown(mask: np.ndarray, boxes: list[tuple[str, tuple[float, float, float, float]]]) -> None:
    """Inside a corrected box that no mask region covers, the pixels are unknown (255), not
    "nothing here": the box says an object is there without saying which pixels."""
    height, width = mask.shape
    for _, (x0, y0, x1, y1) in boxes:
        area = mask[int(y0 * height) : max(int(y0 * height) + 1, round(y1 * height)),
                    int(x0 * width) : max(int(x0 * width) + 1, round(x1 * width))]  # fmt: skip
        area[area == 0] = 255
