"""The project manager's dashboard and the routes behind it, on a real Redis: corrections as the
webhook records them, the version registry, the learning queue."""

from __future__ import annotations

import re

import pytest

from backend.app import create_app
from backend.charts import Point, Series, bar_chart, line_chart
from backend.dashboard import lead_times, per_label, summary
from common.labelstudio.config import parse_label_config

PROJECT = "5.1795414525"


def _tags(*labels: str) -> dict:
    return {"from_name": "tags", "to_name": "image", "type": "choices", "value": {"choices": list(labels)}}


@pytest.fixture
def app(make_settings, redis_url, voc_config):
    app = create_app(make_settings(redis_url=redis_url))
    client = app.test_client()
    assert client.post("/setup", json={"project": PROJECT, "schema": voc_config}).status_code == 200
    feedback = app.extensions["prelabel"].feedback
    version = app.extensions["prelabel"].settings.model_version
    prediction = {"model_version": version, "score": 0.5, "result": [_tags("cat", "<b>dog</b>")]}
    feedback.remember_predictions(PROJECT, {t: prediction for t in range(1, 5)})
    annotations = [
        (1, [_tags("cat", "<b>dog</b>")], 10.0, "2099-11-20T10:00:00Z"),  # accepted unchanged
        (2, [_tags("cat", "<b>dog</b>")], 12.0, "2099-11-20T11:00:00Z"),  # accepted unchanged
        (3, [_tags("cat")], 20.0, "2099-11-21T10:00:00Z"),  # a tag removed
        (4, [_tags("cat", "<b>dog</b>", "bird")], 30.0, "2099-11-21T11:00:00Z"),  # a tag added
        (9, [_tags("bird")], 60.0, "2099-11-21T12:00:00Z"),  # a task that had no pre-label
        (10, [_tags("cat")], 40.0, "2099-11-21T13:00:00Z"),
    ]
    for task, result, lead_time, at in annotations:
        feedback.record(PROJECT, {"id": 100 + task, "task": task, "result": result, "lead_time": lead_time,
                                  "created_at": at, "updated_at": at})  # fmt: skip
    return app


def test_the_figures_behind_the_page():
    records = [
        {"version": "v", "at": 0.0, "unchanged": True, "tags_added": 0, "tags_removed": 0, "prelabeled": True,
         "lead_time": 10.0, "tags": {"cat": {"accepted": 1, "added": 0, "removed": 0}}, "mask_iou": {"cat": 0.5}},
        {"version": "v", "at": 9.0, "unchanged": False, "tags_added": 1, "tags_removed": 1, "prelabeled": True,
         "lead_time": 20.0, "tags": {"cat": {"accepted": 0, "added": 0, "removed": 1},
                                     "dog": {"accepted": 0, "added": 1, "removed": 0}}, "mask_iou": {"cat": 1.0}},
        {"version": None, "at": 5.0, "prelabeled": False, "lead_time": 60.0},
    ]  # fmt: skip
    s = summary(records[:2])
    assert s["corrections"] == 2 and s["unchanged_share"] == 0.5 and s["tags_added"] == 0.5 and s["mean_iou"] == 0.75
    assert (s["first_at"], s["last_at"]) == (0.0, 9.0)
    cat, dog = per_label(records[:2])
    assert (cat["label"], cat["accepted"], cat["removed"], cat["acceptance"]) == ("cat", 1, 1, 0.5)
    assert cat["mask_iou"] == (0.75, 2) and dog["added"] == 1 and dog["acceptance"] is None
    times = lead_times(records)
    assert times["with"]["median"] == 15.0 and times["without"]["median"] == 60.0
    assert times["saved_share"] == pytest.approx(0.75)


def test_charts_are_svg_with_escaped_text_and_a_tooltip_per_point():
    chart = line_chart([Series("<script>", [Point(0, 0.5, "day 1: 50 % of 4"), Point(1, 0.75, "a<b")])], "t&t")
    assert chart.startswith("<svg") and chart.count("<circle") == 2 and "<polyline" in chart
    assert "<script>" not in chart and "&lt;script&gt;" in chart and "a&lt;b" in chart and "t&amp;t" in chart
    assert "No data yet" in line_chart([], "empty") and "No data yet" in bar_chart([], "empty")
    assert bar_chart([Point(0, 0.2, "v1: 20 %"), Point(0, 0.9, "v2: 90 %")], "bars").count("<rect") == 2


def test_the_overview_lists_projects_and_links_each(app):
    page = app.test_client().get("/dashboard")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert f'href="?project={PROJECT}"' in html
    assert re.search(r"<td class=\"num\">4</td><td class=\"num\">50 %</td>", html)  # 4 corrections, half unchanged


def test_a_projects_page_by_label_studios_plain_id(app):
    html = app.test_client().get("/dashboard?project=5").get_data(as_text=True)
    assert f"Project {PROJECT}" in html
    assert '<b id="corrections">4</b>' in html and '<b id="unchanged">50 %</b>' in html
    # annotator time: median 16 s with a pre-label (10, 12, 20, 30), 50 s without (60, 40)
    assert '<b id="saved">68 %</b>' in html
    assert html.count("<svg") >= 3 and html.count("<circle") >= 2  # accepted unchanged over two days
    assert "&lt;b&gt;dog&lt;/b&gt;" in html and "<b>dog</b>" not in html  # labels are escaped
    assert "2099-11-21" in html


def test_report_and_jobs_take_the_plain_project_id(app, voc_config):
    client = app.test_client()
    by_id, by_uid = client.get("/report?project=5").get_json(), client.get(f"/report?project={PROJECT}").get_json()
    assert by_id == by_uid and by_id[PROJECT][app.extensions["prelabel"].settings.model_version]["corrections"] == 4
    missing = client.get("/report?project=77")
    assert missing.status_code == 404 and "knows no Label Studio project 77" in missing.get_json()["error"]

    training = app.extensions["prelabel"].training
    job, _ = training.enqueue(PROJECT, parse_label_config(voc_config, 100), "start_training")  # no worker: waits
    listed = client.get("/jobs?project=5").get_json()
    assert listed["project"] == PROJECT
    assert [(j["id"], j["kind"], j["status"]) for j in listed["jobs"]] == [(job.id, "training", "queued")]
    assert job.id in client.get("/dashboard?project=5").get_data(as_text=True)
    assert client.get("/jobs").status_code == 400
