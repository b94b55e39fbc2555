"""What annotators did with the pre-labels: kept, fixed or replaced them.

The backend keeps each task's prediction when it serves it; when an annotation arrives (webhook)
the two are compared: tags accepted, added and removed, IoU per label between the predicted and
the final masks, boxes and polygons, and whether the prediction went through unchanged.
Comparisons are kept per annotation (an update replaces, a deletion removes) and aggregated per
model version and label for ``GET /report`` and ``/metrics``.

Decoding masks takes time and memory, and Label Studio gives an event webhook one second, so the
webhook only checks an annotation's regions (how many; brush sizes and RLE headers, without
decoding; box and polygon numbers; labels) and puts it in an inbox in Redis; a thread of the
backend compares it later. An annotation taken from the inbox stays in a processing list until
its comparison is stored, and a backend that starts moves what a dead one left there back to the
inbox (comparisons are idempotent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np
import redis

from common import keys
from common.errors import AnnotationError, ServiceUnavailable
from common.labelstudio.annotations import check_annotation, chosen, regions
from common.labelstudio.brush import region_mask
from common.labelstudio.regions import outline_mask, region_labels
from common.quality import accepted_unchanged, mask_iou

log = logging.getLogger(__name__)

#: Predictions are kept this long for comparison with the corrections that follow them.
PREDICTION_TTL = 90 * 24 * 3600
#: The IoU figures of a comparison, each per label, and the results they compare.
IOU_KINDS = {"mask_iou": "brushlabels", "box_iou": "rectanglelabels", "polygon_iou": "polygonlabels"}
#: Fields of a project's aggregates hash besides the per-version ones.
BUILT, LAST_AT = "\tbuilt", "\tlast_at"
#: Seconds Label Studio's clock may be behind the backend's when telling whether a pre-label was
#: served before an annotation was made.
CLOCK_SLACK = 5.0
#: A comparison stored under concurrent writers tries this many times (each try is one Redis
#: transaction; they conflict only while another process stores the same project's).
STORE_TRIES = 50
#: Deleted annotation ids looked up per Redis round trip.
FORGET_BATCH = 1_000
#: Lead times over a day are left out of the annotator-time figures.
MAX_LEAD_TIME = 24 * 3600
#: Annotations waiting for comparison take at most this much of Redis's memory.
INBOX_BYTES = 256 * 1024 * 1024


def compare(predicted: list[dict], final: list[dict], max_pixels: int) -> dict[str, Any]:
    """Compare a prediction's result list with an annotation's (Label Studio's result format):
    tags, and per label the IoU of the predicted and final masks, boxes and polygons (each kind
    as the union of its regions). Only the prediction's labels are drawn: a label the annotator
    added scores 0 without drawing it, so an annotation's own labels cost no memory."""
    tags_p, tags_f = chosen(predicted), chosen(final)
    tags: dict[str, dict[str, int]] = defaultdict(lambda: {"accepted": 0, "added": 0, "removed": 0})
    for control in set(tags_p) | set(tags_f):
        offered, kept = tags_p.get(control, set()), tags_f.get(control, set())
        for label, outcome in [*((x, "accepted") for x in offered & kept), *((x, "added") for x in kept - offered),
                               *((x, "removed") for x in offered - kept)]:  # fmt: skip
            tags[label][outcome] += 1
    accepted, added, removed = (sum(t[k] for t in tags.values()) for k in ("accepted", "added", "removed"))
    ious = {}
    for name, kind in IOU_KINDS.items():
        drawn = _drawn(predicted, kind, max_pixels)
        final_drawn = _drawn(final, kind, max_pixels, only=set(drawn))
        ious[name] = {
            label: _iou(drawn.get(label), final_drawn.get(label)) for label in set(drawn) | _labels(final, kind)
        }
    unchanged = accepted_unchanged(added, removed, (v for kind in ious.values() for v in kind.values()))
    return {"tags_accepted": accepted, "tags_added": added, "tags_removed": removed, "tags": dict(tags), **ious,
            "unchanged": unchanged}  # fmt: skip


def _timestamp(annotation: dict, order: tuple[str, ...] = ("updated_at", "created_at")) -> float:
    """When the annotation was last saved (or, with ``order`` reversed, first), else now."""
    for key in order:
        value = annotation.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError, OverflowError, OSError):
                return datetime.fromisoformat(value[:64].replace("Z", "+00:00")).timestamp()
    return time.time()


def _lead_time(annotation: dict) -> float | None:
    """Seconds the annotator had the task open (Label Studio's ``lead_time``); None when missing
    or over MAX_LEAD_TIME (a task left open overnight says nothing about labelling)."""
    value = annotation.get("lead_time")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= MAX_LEAD_TIME:
        return float(value)
    return None


def _add_to_totals(pipe: redis.client.Pipeline, totals: str, record: dict[str, Any], sign: int) -> None:
    """Add (``sign`` 1) or take away (-1) one comparison in the project's aggregates hash: fields
    ``<version>\t<stat>`` and ``<version>\t<kind>\t<label>\t(sum|n)``."""
    if not record.get("prelabeled", True):
        return
    version = record.get("version") or "unknown"
    pipe.hincrby(totals, f"{version}\tcorrections", sign)
    pipe.hincrby(totals, f"{version}\tunchanged", sign * int(bool(record["unchanged"])))
    for stat in ("tags_accepted", "tags_added", "tags_removed"):
        pipe.hincrby(totals, f"{version}\t{stat}", sign * int(record[stat]))
    for kind in IOU_KINDS:
        for label, iou in record.get(kind, {}).items():
            pipe.hincrbyfloat(totals, f"{version}\t{kind}\t{label}\tsum", sign * float(iou))
            pipe.hincrby(totals, f"{version}\t{kind}\t{label}\tn", sign)


def _iou(predicted: np.ndarray | None, final: np.ndarray | None) -> float:
    if predicted is None or final is None or predicted.shape != final.shape:
        return 0.0
    return mask_iou(predicted, final)


def _labels(result: Iterable[dict], kind: str) -> set[str]:
    """The labels of a result list's regions of ``kind`` (brush regions with an RLE only)."""
    return {label for item in regions(result, (kind,)) for label in region_labels(item)}


def _drawn(result: Iterable[dict], kind: str, max_pixels: int, only: set[str] | None = None) -> dict[str, np.ndarray]:
    """Per label (of ``only``, when given), the union of its regions of ``kind``: brush masks at
    the image's size, boxes and polygons on the percent grid."""
    out: dict[str, np.ndarray] = {}
    for item in regions(result, (kind,)):
        labels = [label for label in region_labels(item) if only is None or label in only]
        if not labels:
            continue
        region = region_mask(item, max_pixels) if kind == "brushlabels" else outline_mask(item)
        for label in labels:
            if label not in out:
                out[label] = region.copy()
            elif out[label].shape == region.shape:
                np.logical_or(out[label], region, out=out[label])
    return out


class Feedback:
    """Predictions served and the corrections that followed, in Redis."""

    def __init__(self, connection: redis.Redis, max_pixels: int) -> None:
        self.connection = connection
        self.max_pixels = max_pixels
        self._stop = threading.Event()

    def remember_predictions(self, project: str, predictions: dict[Any, dict]) -> None:
        """Keep what was predicted for each task id (Label Studio prediction dicts), and when: an
        annotation made before its task's pre-label was served was made without it."""
        if not predictions:
            return
        key = keys.served_predictions(project)
        now = time.time()
        pipe = self.connection.pipeline()
        pipe.hset(key, mapping={str(task): json.dumps({**p, "served_at": now}) for task, p in predictions.items()})
        pipe.expire(key, PREDICTION_TTL)
        pipe.execute()

    def accept(
        self, project: str, annotations: list[dict], labels: Iterable[str] | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """Check each annotation and put the good ones in the inbox, with the project's ``labels``
        (its label config's: per-label figures keep only those); returns how many were queued
        and, for the others, their id and the reason."""
        queued, refused = [], []
        for annotation in annotations:
            try:
                check_annotation(annotation, self.max_pixels)
            except AnnotationError as e:
                refused.append({"id": annotation.get("id"), "error": str(e)})
                continue
            queued.append(annotation)
        if queued:
            # One inbox item per event: the project's labels are stored once, not once per annotation.
            known = sorted(labels) if labels is not None else None
            item = json.dumps({"project": project, "annotations": queued, "labels": known})
            waiting = self.connection.memory_usage(keys.FEEDBACK_INBOX, samples=0) or 0  # exact: no sampling to game
            if waiting + len(item) > INBOX_BYTES:
                raise ServiceUnavailable(
                    f"{waiting // 2**20} MB of corrections are waiting to be compared and this event holds "
                    f"{len(item) // 2**20} MB more; it was not recorded (Label Studio keeps its annotations, and "
                    "training reads them from there)."
                )
            self.connection.rpush(keys.FEEDBACK_INBOX, item)
        return len(queued), refused

    def record(self, project: str, annotation: dict, labels: Iterable[str] | None = None) -> dict[str, Any] | None:
        """Compare ``annotation`` with the prediction its task got, and keep when it was made and
        how long the annotator took. An annotation made before any prediction was served for its
        task is kept too (``prelabeled`` false: the time annotators take without pre-labels).
        Per-label figures keep only ``labels`` (the project's), when given. None when skipped."""
        if annotation.get("was_cancelled"):
            return None
        task = annotation.get("task")
        task = task.get("id") if isinstance(task, dict) else task
        raw = self.connection.hget(keys.served_predictions(project), str(task))
        prediction = json.loads(raw) if raw is not None else None
        started = _timestamp(annotation, ("created_at", "updated_at"))
        prelabeled = prediction is not None and prediction.get("served_at", 0.0) <= started + CLOCK_SLACK
        record: dict[str, Any] = {"task": task, "at": _timestamp(annotation), "lead_time": _lead_time(annotation),
                                  "prelabeled": prelabeled, "version": None}  # fmt: skip
        if prelabeled:
            record["version"] = prediction.get("model_version")
            record.update(compare(prediction.get("result", []), annotation.get("result") or [], self.max_pixels))
            if labels is not None:
                keep = set(labels)
                for field in ("tags", *IOU_KINDS):
                    record[field] = {label: v for label, v in record[field].items() if label in keep}
        self._store(project, str(annotation["id"]), record)
        return record

    def _store(self, project: str, annotation_id: str | None, record: dict[str, Any] | None) -> None:
        """Keep (or, with None, drop) one annotation's comparison and move the project's aggregates
        by the difference, in one transaction. Aggregates missing their "built" mark (comparisons
        kept before aggregates existed) are first rebuilt from every comparison, in the same one.
        With ``annotation_id`` None it only makes sure the aggregates are built."""
        key, totals = keys.corrections(project), keys.correction_totals(project)
        with self.connection.pipeline() as pipe:
            for _ in range(STORE_TRIES):
                try:
                    pipe.watch(key, totals)
                    built = pipe.hexists(totals, BUILT)
                    if built and annotation_id is None:
                        return
                    old = pipe.hget(key, annotation_id) if annotation_id is not None else None
                    earlier = [] if built else pipe.hvals(key)
                    last = float(pipe.hget(totals, LAST_AT) or 0.0)
                    pipe.multi()
                    if not built:
                        pipe.delete(totals)
                        for row in map(json.loads, earlier):
                            _add_to_totals(pipe, totals, row, +1)
                            last = max(last, row.get("at", 0.0))
                        pipe.hset(totals, mapping={BUILT: 1, LAST_AT: last})
                    if old is not None:
                        _add_to_totals(pipe, totals, json.loads(old), -1)
                    if annotation_id is not None and record is None:
                        pipe.hdel(key, annotation_id)
                    elif annotation_id is not None:
                        pipe.hset(key, annotation_id, json.dumps(record))
                        _add_to_totals(pipe, totals, record, +1)
                        pipe.hset(totals, LAST_AT, max(last, record["at"]))
                        pipe.sadd(keys.PROJECTS_WITH_CORRECTIONS, project)
                    pipe.execute()
                    return
                except redis.WatchError:  # another process changed the project's comparisons: again
                    continue
        raise redis.exceptions.RedisError(f"project {project}: comparisons kept changing; not stored")

    def aggregates(self, project: str) -> dict[str, dict[str, Any]]:
        """Per model version: corrections, accepted unchanged, tag outcomes, and per region kind
        and label (IoU sum, count); kept as corrections arrive, so reading them costs one hash."""
        self._store(project, None, None)
        out: dict[str, dict[str, Any]] = {}
        for raw_field, raw_value in self.connection.hgetall(keys.correction_totals(project)).items():
            version, stat, *rest = raw_field.decode().split("\t", 2)  # a label may hold a tab itself
            if not version:  # the built mark, the last correction's time
                continue
            row = out.setdefault(version, {"corrections": 0, "unchanged": 0, "tags_accepted": 0, "tags_added": 0,
                                           "tags_removed": 0, **{kind: {} for kind in IOU_KINDS}})  # fmt: skip
            value = float(raw_value)
            if stat in IOU_KINDS:  # label, then "sum" or "n"
                label, part = rest[0].rsplit("\t", 1)
                total, count = row[stat].get(label, (0.0, 0))
                row[stat][label] = (total + value, count) if part == "sum" else (total, count + round(value))
            else:
                row[stat] = round(value)
        return out

    def last_correction_at(self, project: str) -> float | None:
        value = self.connection.hget(keys.correction_totals(project), LAST_AT)
        return float(value) if value is not None else None

    def records(self, project: str) -> list[dict[str, Any]]:
        """Every kept comparison of ``project`` (older ones, from before timestamps, get time 0)."""
        rows = [json.loads(raw) for raw in self.connection.hvals(keys.corrections(project))]
        for row in rows:
            row.setdefault("at", 0.0)
            row.setdefault("prelabeled", True)  # kept only for pre-labelled tasks before
        return rows

    def projects(self) -> list[str]:
        """Every project prelabel knows: connected (``/setup``) or with corrections."""
        found = {p.decode() for p in self.connection.smembers(keys.PROJECTS_WITH_CORRECTIONS)}
        found.update(k.decode() for k in self.connection.hkeys(keys.PROJECTS))
        return sorted(found)

    def process_one(self, timeout: float = 1.0) -> bool:
        """Compare the annotations of the inbox's oldest event; False when the inbox stayed empty
        for ``timeout``."""
        raw = self.connection.blmove(keys.FEEDBACK_INBOX, keys.FEEDBACK_PROCESSING, timeout)
        if raw is None:
            return False
        try:
            item = json.loads(raw)
            project, labels = item["project"], item.get("labels")
            # one annotation per item from backends before events were batched, still in the inbox after an upgrade
            annotations = list(item["annotations"]) if "annotations" in item else [item["annotation"]]
        except (ValueError, TypeError, KeyError) as e:  # not written by accept(): dropped, said once
            log.warning("an unreadable inbox item was dropped: %s: %s", type(e).__name__, e)
            annotations = []
        for annotation in annotations:
            try:
                self.record(project, annotation, labels)
            except redis.exceptions.RedisError:
                raise  # the event stays in the processing list, taken back (and redone) when Redis answers
            except Exception as e:  # e.g. an RLE corrupt past its header: dropped, said once
                named = annotation.get("id") if isinstance(annotation, dict) else None
                log.warning("annotation %.40r was not compared: %s: %s", named, type(e).__name__, e)
        self.connection.lrem(keys.FEEDBACK_PROCESSING, 1, raw)
        return True

    def start_comparing(self) -> threading.Thread:
        """The thread that empties the inbox, after taking back what a dead backend left half done."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    while self.connection.lmove(keys.FEEDBACK_PROCESSING, keys.FEEDBACK_INBOX):
                        pass
                    while not self._stop.is_set():
                        self.process_one(timeout=1)
                except redis.exceptions.RedisError as e:  # Redis away for a while: try again shortly
                    log.warning("comparing corrections paused: Redis: %s", e)
                    self._stop.wait(2)

        thread = threading.Thread(target=loop, name="prelabel-feedback", daemon=True)
        thread.start()
        return thread

    def stop_comparing(self) -> None:
        self._stop.set()

    def forget(self, project: str, annotation_ids: Iterable[Any]) -> None:
        """Drop the comparisons of deleted annotations: one transaction for each that was kept, so
        an event listing millions of ids costs a lookup each, not a transaction."""
        ids = list(dict.fromkeys(str(a) for a in annotation_ids))
        key = keys.corrections(project)
        for start in range(0, len(ids), FORGET_BATCH):
            batch = ids[start : start + FORGET_BATCH]
            for annotation_id, kept in zip(batch, self.connection.hmget(key, batch), strict=True):
                if kept is not None:
                    self._store(project, annotation_id, None)

    def report(self, project: str | None = None, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Per project and model version: corrections, share accepted unchanged, tag counts, and
        per label the mean IoU between predicted and final masks, boxes and polygons. ``records``:
        the project's comparisons, when the caller has read them already."""
        out: dict[str, Any] = {}
        for p in [project] if project else self.projects():
            by_version: dict[str, dict[str, Any]] = {}
            for record in records if records is not None and project else self.records(p):
                if not record["prelabeled"]:
                    continue
                row = by_version.setdefault(record["version"] or "unknown", {
                    "corrections": 0, "unchanged": 0, "tags_accepted": 0, "tags_added": 0, "tags_removed": 0,
                    **{kind: defaultdict(list) for kind in IOU_KINDS}, "first_at": record["at"],
                    "last_at": record["at"],
                })  # fmt: skip
                row["first_at"], row["last_at"] = min(row["first_at"], record["at"]), max(row["last_at"], record["at"])
                row["corrections"] += 1
                row["unchanged"] += int(record["unchanged"])
                for k in ("tags_accepted", "tags_added", "tags_removed"):
                    row[k] += record[k]
                for kind in IOU_KINDS:
                    for label, iou in record.get(kind, {}).items():
                        row[kind][label].append(iou)
            for row in by_version.values():
                row["unchanged_share"] = row["unchanged"] / row["corrections"]
                for kind in IOU_KINDS:
                    row[kind] = {label: float(np.mean(v)) for label, v in row[kind].items()}
            out[p] = by_version
        return out
