"""Comparing pre-labels with corrections, on constructed pairs in Label Studio's real formats, and
the inbox that keeps that work off the webhook's request thread, on a real Redis."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from label_studio_sdk.converter.brush import mask2rle

from backend import feedback as module
from backend.feedback import Feedback, compare
from common import keys
from common.errors import AnnotationError, ServiceUnavailable
from common.keys import FEEDBACK_INBOX as INBOX
from common.keys import FEEDBACK_PROCESSING as PROCESSING
from common.labelstudio.annotations import check_annotation, chosen

PROJECT = "5.1795414525"
MAX_PIXELS = 60_000_000


def _tags(*labels: str) -> dict:
    return {"from_name": "tags", "to_name": "image", "type": "choices", "value": {"choices": list(labels)}}


def _mask(label: str, mask: np.ndarray) -> dict:
    h, w = mask.shape
    value = {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
            "value": value}  # fmt: skip


def _square(top: int, left: int, size: int = 10) -> np.ndarray:
    mask = np.zeros((40, 60), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_an_accepted_prediction_is_unchanged():
    result = [_tags("cat", "dog"), _mask("cat", _square(5, 5))]
    stats = compare(result, result, MAX_PIXELS)
    assert stats == {"tags_accepted": 2, "tags_added": 0, "tags_removed": 0, "mask_iou": {"cat": 1.0},
                     "tags": {"cat": {"accepted": 1, "added": 0, "removed": 0},
                              "dog": {"accepted": 1, "added": 0, "removed": 0}},
                     "box_iou": {}, "polygon_iou": {}, "unchanged": True}  # fmt: skip


def test_fixed_tags_and_masks_are_counted():
    predicted = [_tags("cat", "dog"), _mask("cat", _square(5, 5)), _mask("dog", _square(20, 30))]
    final = [_tags("cat", "person"), _mask("cat", _square(5, 10)), _mask("person", _square(20, 30))]
    stats = compare(predicted, final, MAX_PIXELS)
    assert (stats["tags_accepted"], stats["tags_added"], stats["tags_removed"]) == (1, 1, 1)
    assert stats["mask_iou"]["cat"] == pytest.approx(50 / 150)  # shifted by half its width
    assert stats["mask_iou"]["dog"] == 0.0 and stats["mask_iou"]["person"] == 0.0
    assert not stats["unchanged"]


def _box(label: str, x: float, y: float, width: float, height: float, rotation: float = 0) -> dict:
    value = {"x": x, "y": y, "width": width, "height": height, "rotation": rotation, "rectanglelabels": [label]}
    return {"from_name": "boxes", "to_name": "image", "type": "rectanglelabels", "original_width": 400,
            "original_height": 200, "value": value}  # fmt: skip


def _polygon(label: str, points: list) -> dict:
    return {"from_name": "outlines", "to_name": "image", "type": "polygonlabels",
            "value": {"points": points, "polygonlabels": [label]}}  # fmt: skip


def test_boxes_and_polygons_are_compared_per_label():
    box, triangle = _box("car", 10, 20, 30, 40), _polygon("car", [[10, 10], [50, 10], [10, 50]])
    same = compare([box, triangle], [box, triangle], MAX_PIXELS)
    assert same["box_iou"] == {"car": 1.0} and same["polygon_iou"] == {"car": 1.0} and same["unchanged"]

    moved = compare([box], [_box("car", 25, 20, 30, 40)], MAX_PIXELS)  # half of it overlaps
    assert moved["box_iou"]["car"] == pytest.approx(15 / 45, abs=0.01) and not moved["unchanged"]
    halved = compare([triangle], [_polygon("car", [[10, 10], [50, 10], [10, 50], [10, 30]])], MAX_PIXELS)
    assert halved["polygon_iou"]["car"] == pytest.approx(1.0, abs=0.01)  # a redundant point changes nothing
    other = compare([box], [_box("bus", 10, 20, 30, 40)], MAX_PIXELS)
    assert other["box_iou"] == {"car": 0.0, "bus": 0.0}


def test_a_rotated_box_turns_about_its_top_left_corner_in_pixels():
    """On a 400 x 200 image, a 10 % x 20 % box (40 x 40 pixels) turned by 90 degrees clockwise lies
    to the left of its corner: x from -10 % to 0 %, y from 20 % to 40 %."""
    turned = compare([_box("car", 10, 20, 10, 20, rotation=90)], [_box("car", 0, 20, 10, 20)], MAX_PIXELS)
    assert turned["box_iou"]["car"] == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(
    "item",
    [
        _polygon("car", [[1, 2], [3, 4]]),
        _polygon("car", [[1, 2], [3, "x"], [5, 6]]),
        _polygon("car", [[1, 2]] * 10_001),
        _box("car", float("nan"), 0, 10, 10),
        {"type": "rectanglelabels", "value": {"x": 1, "y": 2, "width": True, "height": 3}},
        _box("car", 10**400, 0, 10, 10),
        _box("car", 1e300, 0, 10, 10),
        {**_box("car", 1, 2, 3, 4, rotation=30), "original_width": None},
        {**_box("car", 1, 2, 3, 4), "value": {"x": 1, "y": 2, "width": 3, "height": 4, "rectanglelabels": [7]}},
        {**_box("car", 1, 2, 3, 4), "value": {"x": 1, "y": 2, "width": 3, "height": 4, "rectanglelabels": "car"}},
    ],
)
def test_malformed_boxes_and_polygons_are_refused_at_the_webhook(item):
    with pytest.raises(AnnotationError, match="Annotation 7: A (box|polygon|rotated box|region)"):
        check_annotation({"id": 7, "result": [item]}, MAX_PIXELS)


@pytest.mark.parametrize(
    "item",
    [
        {"type": "choices", "from_name": "tags", "value": {"choices": "cat"}},
        {"type": "choices", "from_name": "tags", "value": {"choices": [7]}},
        {"type": "choices", "from_name": "tags", "value": {"choices": ["cat"] * 101}},
    ],
)
def test_malformed_choices_are_refused_and_never_crash_a_reader(item):
    """Label Studio's API checks only that ``result`` is a list: training reads what the webhook
    would have refused, so both check, and the readers survive what neither refuses."""
    with pytest.raises(AnnotationError, match="Annotation 7: A region's labels must be a list"):
        check_annotation({"id": 7, "result": [item]}, MAX_PIXELS)
    odd = [{"type": "choices", "value": "x"}, {"type": "brushlabels", "value": "x"}, item]
    assert all(isinstance(c, str) for made in chosen(odd).values() for c in made)
    assert compare(odd, odd, MAX_PIXELS)["unchanged"]


def test_forgetting_costs_a_transaction_only_for_comparisons_kept(redis_url, monkeypatch):
    """An ANNOTATIONS_DELETED event may list millions of ids; most were never compared here."""
    feedback = Feedback(redis.Redis.from_url(redis_url), MAX_PIXELS)
    for annotation_id in (1, 2, 3):
        feedback.record(PROJECT, {"id": annotation_id, "task": annotation_id, "result": [_tags("cat")]})
    stored, store = [], feedback._store
    monkeypatch.setattr(feedback, "_store", lambda project, *rest: stored.append(rest[0]) or store(project, *rest))
    feedback.forget(PROJECT, [*range(1000, 4000), 1, "1", 2])
    assert stored == ["1", "2"]
    assert [r["task"] for r in feedback.records(PROJECT)] == [3]


def test_an_annotation_holds_a_bounded_number_of_regions_and_points():
    with pytest.raises(AnnotationError, match="more than 1,000 regions"):
        check_annotation({"id": 7, "result": [_box("car", 1, 1, 2, 2)] * 1001}, MAX_PIXELS)
    big = _polygon("car", [[i % 100, i // 100] for i in range(10_000)])
    check_annotation({"id": 7, "result": [big] * 10}, MAX_PIXELS)  # 100,000 points: the most
    with pytest.raises(AnnotationError, match="more than 100,000 polygon points"):
        check_annotation({"id": 7, "result": [big] * 11}, MAX_PIXELS)


def test_labels_only_the_annotator_drew_score_zero_without_being_drawn():
    """An annotation's own labels cost no memory: 900 made-up labels are not rasterised."""
    predicted = [_box("car", 10, 20, 30, 40)]
    final = [_box("car", 10, 20, 30, 40)] + [_box(f"label {i}", 0, 0, 100, 100) for i in range(900)]
    stats = compare(predicted, final, MAX_PIXELS)
    assert stats["box_iou"]["car"] == 1.0 and len(stats["box_iou"]) == 901
    assert all(iou == 0.0 for label, iou in stats["box_iou"].items() if label != "car")


def test_report_per_version_with_updates_and_deletions(redis_url):
    feedback = Feedback(redis.Redis.from_url(redis_url), MAX_PIXELS)
    prediction = {"model_version": "v1", "score": 0.5, "result": [_tags("cat"), _mask("cat", _square(5, 5))]}
    feedback.remember_predictions(PROJECT, {11: prediction, 12: prediction})
    accepted = {"id": 101, "task": 11, "result": prediction["result"], "lead_time": 4.5,
                "created_at": "2099-11-20T10:00:00Z", "updated_at": "2099-11-20T10:00:05.5Z"}  # fmt: skip
    fixed = {"id": 102, "task": 12, "result": [_tags("cat", "dog"), _mask("cat", _square(5, 10))], "lead_time": 1e9}
    assert feedback.record(PROJECT, accepted)["unchanged"]
    assert not feedback.record(PROJECT, fixed)["unchanged"]
    unaided = feedback.record(PROJECT, {"id": 103, "task": 99, "result": [], "lead_time": 30})  # never predicted
    assert not unaided["prelabeled"] and unaided["lead_time"] == 30.0 and unaided["version"] is None
    assert feedback.record(PROJECT, {"id": 104, "task": 11, "was_cancelled": True}) is None  # skipped: not kept

    records = {r["task"]: r for r in feedback.records(PROJECT)}
    assert records[11]["at"] == datetime(2099, 11, 20, 10, 0, 5, 500000, tzinfo=UTC).timestamp()
    assert records[11]["lead_time"] == 4.5 and records[12]["lead_time"] is None  # 31 years open: left out
    assert records[12]["tags"] == {"cat": {"accepted": 1, "added": 0, "removed": 0},
                                   "dog": {"accepted": 0, "added": 1, "removed": 0}}  # fmt: skip
    row = feedback.report(PROJECT)[PROJECT]["v1"]  # only tasks that had a pre-label
    assert row["corrections"] == 2 and row["unchanged_share"] == 0.5 and row["tags_added"] == 1
    assert row["first_at"] == records[12]["at"] < row["last_at"] == records[11]["at"]
    assert row["mask_iou"]["cat"] == pytest.approx((1.0 + 50 / 150) / 2)

    feedback.record(PROJECT, {**fixed, "result": prediction["result"]})  # the annotator updates it back
    assert feedback.report(PROJECT)[PROJECT]["v1"]["unchanged_share"] == 1.0
    feedback.forget(PROJECT, [101])
    assert feedback.report()[PROJECT]["v1"]["corrections"] == 1


def test_the_webhook_only_checks_and_queues_and_the_comparison_happens_later(redis_url):
    connection = redis.Redis.from_url(redis_url)
    feedback = Feedback(connection, MAX_PIXELS)
    prediction = {"model_version": "v1", "score": 0.5, "result": [_tags("cat"), _mask("cat", _square(5, 5))]}
    feedback.remember_predictions(PROJECT, {11: prediction})
    bomb = _mask("cat", _square(5, 5))
    bomb.update(original_width=50_000, original_height=40_000)  # 2 GP announced by a 40x60 mask's RLE
    queued, refused = feedback.accept(PROJECT, [
        {"id": 101, "task": 11, "result": prediction["result"]},
        {"id": 102, "task": 11, "result": [bomb]},
        {"id": 103, "task": 11, "result": "not a list"},
        {"id": 104, "task": 11, "result": [_tags("dog")]},
    ], labels=["cat", "dog"])  # fmt: skip
    assert queued == 2
    assert [r["id"] for r in refused] == [102, 103]
    assert "over MAX_IMAGE_PIXELS" in refused[0]["error"] and "must be a list" in refused[1]["error"]
    assert feedback.report(PROJECT)[PROJECT] == {}  # nothing compared yet: the webhook has answered
    assert connection.llen(INBOX) == 1  # one item per event: the project's labels are stored once
    assert feedback.process_one(timeout=1)
    assert not feedback.process_one(timeout=1)  # the inbox is empty
    row = feedback.report(PROJECT)[PROJECT]["v1"]
    assert (row["corrections"], row["unchanged"]) == (2, 1)
    assert connection.llen(PROCESSING) == 0


def test_work_left_half_done_is_taken_back_and_a_poisoned_item_is_dropped(redis_url):
    connection = redis.Redis.from_url(redis_url)
    feedback = Feedback(connection, MAX_PIXELS)
    prediction = {"model_version": "v1", "score": 0.5, "result": [_tags("cat")]}
    feedback.remember_predictions(PROJECT, {11: prediction})
    feedback.accept(PROJECT, [{"id": 101, "task": 11, "result": [_tags("cat")]}])
    connection.lmove(INBOX, PROCESSING)  # a backend died after taking it
    connection.rpush(INBOX, b"{not json")  # and someone wrote garbage into the inbox
    older = {"project": PROJECT, "annotation": {"id": 102, "task": 11, "result": []}, "labels": None}
    connection.rpush(INBOX, json.dumps(older))  # and an older backend one annotation, as it queued them
    connection.rpush(INBOX, json.dumps({"project": PROJECT, "annotations": ["not an object"]}))
    thread = feedback.start_comparing()
    deadline = time.monotonic() + 10
    while not feedback.report(PROJECT)[PROJECT]:
        assert time.monotonic() < deadline, "the half-done correction was not compared"
        time.sleep(0.05)
    while connection.llen(INBOX) or connection.llen(PROCESSING):
        assert time.monotonic() < deadline, "the garbage item was not dropped"
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while feedback.report(PROJECT)[PROJECT]["v1"]["corrections"] < 2:
        assert time.monotonic() < deadline, "the older backend's item was not compared"
        time.sleep(0.05)
    assert feedback.report(PROJECT)[PROJECT]["v1"]["corrections"] == 2  # the half-done one counted once
    feedback.stop_comparing()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_full_inbox_refuses_more_and_says_why(redis_url, monkeypatch):
    feedback = Feedback(redis.Redis.from_url(redis_url), MAX_PIXELS)
    annotation = {"id": 1, "task": 11, "result": [_mask("cat", _square(5, 5))]}
    one = len(json.dumps({"project": PROJECT, "annotations": [annotation], "labels": None}))
    monkeypatch.setattr(module, "INBOX_BYTES", 2 * one)
    assert feedback.accept(PROJECT, [annotation]) == (1, [])  # under the limit while the inbox is empty
    with pytest.raises(ServiceUnavailable, match="waiting to be compared and this event holds"):
        feedback.accept(PROJECT, [annotation] * 2)  # what waits plus what it would add
    assert feedback.connection.llen(INBOX) == 1
    feedback.connection.delete(INBOX)
    with pytest.raises(ServiceUnavailable, match="waiting to be compared"):
        feedback.accept(PROJECT, [annotation] * 3)  # too large on its own, however empty the inbox
    assert feedback.connection.llen(INBOX) == 0


def test_aggregates_match_the_report_through_updates_deletions_and_older_comparisons(redis_url):
    """Comparisons kept before the aggregates existed are folded in by the first write or read."""
    connection = redis.Redis.from_url(redis_url)
    feedback = Feedback(connection, MAX_PIXELS)
    prediction = {"model_version": "v1", "score": 0.5, "result": [_tags("cat"), _mask("cat", _square(5, 5))]}
    feedback.remember_predictions(PROJECT, {t: prediction for t in range(1, 6)})
    legacy = {"task": 1, "version": "v1", "tags_accepted": 1, "tags_added": 0, "tags_removed": 0,
              "mask_iou": {"cat": 1.0}, "box_iou": {}, "polygon_iou": {}, "unchanged": True}  # fmt: skip
    for annotation_id in (1, 2, 3):  # as an older backend kept them: no aggregates, no time
        connection.hset(keys.corrections(PROJECT), str(annotation_id), json.dumps({**legacy, "task": annotation_id}))
    feedback.record(PROJECT, {"id": 4, "task": 4, "result": prediction["result"]})
    feedback.record(PROJECT, {"id": 2, "task": 2, "result": [_tags("dog")]})  # an older one updated
    feedback.forget(PROJECT, [3])

    def agree() -> None:
        row, totals = feedback.report(PROJECT)[PROJECT]["v1"], feedback.aggregates(PROJECT)["v1"]
        assert (totals["corrections"], totals["unchanged"]) == (row["corrections"], row["unchanged"]) == (3, 2)
        assert totals["tags_added"] == row["tags_added"] == 1 and totals["tags_removed"] == row["tags_removed"] == 1
        total, count = totals["mask_iou"]["cat"]
        assert total / count == pytest.approx(row["mask_iou"]["cat"])

    agree()
    connection.delete(keys.correction_totals(PROJECT))  # lost (or never built): a read rebuilds them
    agree()
    assert PROJECT in feedback.projects()


def test_an_annotation_made_before_its_pre_label_was_served_counts_as_without_one(redis_url):
    feedback = Feedback(redis.Redis.from_url(redis_url), MAX_PIXELS)
    prediction = {"model_version": "v1", "score": 0.5, "result": [_tags("cat")]}
    feedback.remember_predictions(PROJECT, {1: prediction, 2: prediction})
    before = feedback.record(PROJECT, {"id": 1, "task": 1, "result": [_tags("cat")], "lead_time": 9,
                                       "created_at": "2020-01-01T00:00:00Z"})  # fmt: skip
    assert not before["prelabeled"] and before["version"] is None  # the annotator never saw it
    after = feedback.record(PROJECT, {"id": 2, "task": 2, "result": [_tags("cat", "<script>")]},
                            labels=["cat", "dog"])  # fmt: skip
    assert after["prelabeled"] and after["tags"] == {"cat": {"accepted": 1, "added": 0, "removed": 0}}
    assert after["tags_added"] == 1  # counted, but no per-label row for a label not in the config
