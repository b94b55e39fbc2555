"""What the project manager's dashboard shows, computed from what prelabel already keeps: the
comparisons of predictions with corrections (``backend/feedback.py``), the version registry,
the learning jobs and the queues. Plain dicts and SVG strings; ``routes/dashboard.py`` renders.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from rq import Queue, Worker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from backend.charts import Point, Series, bar_chart, line_chart
from backend.feedback import IOU_KINDS
from backend.job_index import failure, project_jobs
from backend.state import State
from common.jobs import ADAPT_QUEUE, PREDICT_QUEUE, TRAIN_QUEUE, AllowListedJob

#: Failed jobs listed, newest first, per queue.
RECENT_FAILURES = 5
DAY = 24 * 3600


def day(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")


def when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC") if stamp else "-"


def _share(values: Iterable[bool]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _mean_iou(record: dict) -> float | None:
    """The mean over every label and region kind of one comparison (None when it has no regions)."""
    ious = [iou for kind in IOU_KINDS for iou in record.get(kind, {}).values()]
    return sum(ious) / len(ious) if ious else None


def summary(records: list[dict]) -> dict[str, Any]:
    """Headline figures of some comparisons (those of tasks that had a pre-label)."""
    n = len(records)
    ious = [iou for r in records if (iou := _mean_iou(r)) is not None]
    return {
        "corrections": n,
        "unchanged_share": _share(r["unchanged"] for r in records),
        "tags_added": sum(r["tags_added"] for r in records) / n if n else None,
        "tags_removed": sum(r["tags_removed"] for r in records) / n if n else None,
        "mean_iou": sum(ious) / len(ious) if ious else None,
        "first_at": min((r["at"] for r in records), default=None),
        "last_at": max((r["at"] for r in records), default=None),
    }


def per_label(records: list[dict]) -> list[dict[str, Any]]:
    """Per label: how often its tag was accepted, added, removed, and its mean IoU per region kind."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"accepted": 0, "added": 0, "removed": 0})
    ious: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for label, tag in r.get("tags", {}).items():
            for key in ("accepted", "added", "removed"):
                counts[label][key] += tag.get(key, 0)
        for kind in IOU_KINDS:
            for label, iou in r.get(kind, {}).items():
                ious[label][kind].append(iou)
    rows = []
    for label in sorted(set(counts) | set(ious)):
        c = counts[label]
        offered = c["accepted"] + c["removed"]
        rows.append({
            "label": label, **c, "acceptance": c["accepted"] / offered if offered else None,
            **{kind: (sum(v) / len(v), len(v)) if (v := ious[label][kind]) else None for kind in IOU_KINDS},
        })  # fmt: skip
    return rows


def lead_times(records: list[dict]) -> dict[str, Any]:
    """Annotators' time per task (Label Studio's ``lead_time``, seconds the annotation was open),
    on tasks that had a pre-label and on tasks that had none."""
    out = {}
    for name, prelabeled in (("with", True), ("without", False)):
        times = [r["lead_time"] for r in records if r.get("prelabeled") == prelabeled and r.get("lead_time")]
        out[name] = {"n": len(times), "median": statistics.median(times) if times else None,
                     "mean": statistics.fmean(times) if times else None}  # fmt: skip
    with_, without = out["with"]["median"], out["without"]["median"]
    out["saved_share"] = 1 - with_ / without if with_ is not None and without else None
    return out


def over_time(records: list[dict]) -> tuple[str, str]:
    """Two charts, one line per model version, one point per day: the share of pre-labels accepted
    unchanged, and the mean IoU of predicted and corrected regions."""
    by_version_day: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_version_day[r["version"]][day(r["at"])].append(r)
    days = sorted({d for per_day in by_version_day.values() for d in per_day})
    index = {d: i for i, d in enumerate(days)}
    unchanged, iou = [], []
    for version, per_day in sorted(by_version_day.items(), key=lambda item: min(item[1])):
        u_points, i_points = [], []
        for d, rows in sorted(per_day.items()):
            s = summary(rows)
            u_points.append(Point(index[d], s["unchanged_share"], f"{d}, {version}: {s['unchanged_share']:.0%} "
                                  f"accepted unchanged of {s['corrections']} corrections"))  # fmt: skip
            if s["mean_iou"] is not None:
                i_points.append(Point(index[d], s["mean_iou"], f"{d}, {version}: mean IoU {s['mean_iou']:.2f} "
                                      f"over {s['corrections']} corrections"))  # fmt: skip
        unchanged.append(Series(short_version(version), u_points))
        if i_points:
            iou.append(Series(short_version(version), i_points))
    step = max(1, len(days) // 6)
    ticks = [(i, d[5:]) for i, d in enumerate(days)][::step]
    return (
        line_chart(unchanged, "Pre-labels accepted unchanged, per day and model version", x_ticks=ticks),
        line_chart(iou, "Mean IoU of predicted and corrected regions, per day and model version", y_format=".2f",
                   x_ticks=ticks),
    )  # fmt: skip


def short_version(version: str | None) -> str:
    """A version name short enough for a legend: the trained suffix, or the base's hash."""
    if not version:
        return "none"
    if "+" in version:
        return version[version.index("+") :]
    return "base " + version.rsplit("-", 1)[-1]


def per_version_chart(report: dict[str, dict]) -> str:
    bars = [
        Point(
            0,
            row["unchanged_share"],
            f"{short_version(version)}: {row['unchanged_share']:.0%} accepted "
            f"unchanged of {row['corrections']} corrections",
        )  # fmt: skip
        for version, row in sorted(report.items(), key=lambda item: item[1]["first_at"] or 0)
    ]
    return bar_chart(bars, "Pre-labels accepted unchanged, per model version")


def loss_chart(curves: dict[str, list[list[float]]], title: str) -> str:
    """One line per training stage from its (step, loss) points."""
    series = [Series(stage, [Point(step, loss, f"{stage} step {step:.0f}: loss {loss:.4f}") for step, loss in v])
              for stage, v in curves.items() if v]  # fmt: skip
    y_max = max((p.y for s in series for p in s.points), default=1.0)
    return line_chart(series, title, y_max=y_max, y_format=".3f")


def service(current: State) -> dict[str, Any]:
    """Queues, workers and recent failures (queue mode), for every view."""
    if current.connection is None:
        return {"mode": "embedded", "queues": [], "failures": []}
    queues, failures = [], []
    for name in (PREDICT_QUEUE, ADAPT_QUEUE, TRAIN_QUEUE):
        queue = Queue(name, connection=current.connection, serializer=JSONSerializer, job_class=AllowListedJob)
        queues.append({"name": name, "waiting": queue.count, "workers": Worker.count(queue=queue)})
        registry = FailedJobRegistry(queue=queue)
        ids = registry.get_job_ids(-RECENT_FAILURES, -1)  # the newest: scored by when they expire
        for job in AllowListedJob.fetch_many(ids, connection=current.connection, serializer=JSONSerializer):
            if job is None:
                continue
            failures.append({"queue": name, "id": job.id, "description": job.description,
                             "ended_at": job.ended_at.timestamp() if job.ended_at else None,
                             "error": (failure(job.latest_result()) or "")[:300]})  # fmt: skip
    failures.sort(key=lambda f: f["ended_at"] or 0, reverse=True)
    return {"mode": "queue", "queues": queues, "failures": failures[: 2 * RECENT_FAILURES]}


def project_view(current: State, project: str) -> dict[str, Any]:
    feedback = current.require_feedback()
    records = feedback.records(project)
    prelabeled = [r for r in records if r.get("prelabeled")]
    report = feedback.report(project, records)[project]
    unchanged_chart, iou_chart = over_time(prelabeled)
    active = current.registry.active(project)
    served = current.served_version(project)  # what its predictions carry
    versions = [{"version": current.settings.model_version, "created_at": None, "learner": "base model",
                 "promoted": True, "reason": "the model the service starts from", "metrics": {},
                 "active": active == current.settings.model_version}]  # fmt: skip
    for info in current.registry.versions(project):
        versions.append({"version": info.version, "created_at": info.created_at,
                         "learner": (info.config or {}).get("learner", "training"), "promoted": info.promoted,
                         "reason": info.reason, "metrics": info.metrics, "active": info.version == active,
                         "curves": (info.config or {}).get("curves") or {}})  # fmt: skip
    for v in versions:
        v["loss_chart"] = loss_chart(v["curves"], f"Training loss of {v['version']}") if v.get("curves") else None
    assert current.connection is not None  # feedback needs Redis
    jobs = project_jobs(current.connection, project, current.runner.progress)
    learning = [j for j in jobs if j["kind"] in ("training", "few-shot")]
    running = next((j for j in learning if j["status"] in ("queued", "started")), None)
    if running and running.get("curve"):
        running["loss_chart"] = loss_chart({running["progress"]["stage"]: running["curve"]}, "Loss so far")
    return {
        "project": project,
        "active": served,
        "summary": summary(prelabeled),
        "report": report,
        "per_version_chart": per_version_chart(report),
        "unchanged_chart": unchanged_chart,
        "iou_chart": iou_chart,
        "labels": per_label([r for r in prelabeled if r["version"] == served] or prelabeled),
        "labels_of": "the active version" if any(r["version"] == served for r in prelabeled) else "all versions",
        "lead_times": lead_times(records),
        "versions": versions,
        "jobs": jobs,
        "running": running,
        "generated_at": time.time(),
    }


def overview(current: State) -> list[dict[str, Any]]:
    """One row per project prelabel knows, newest correction first; from the aggregates kept as
    corrections arrive (one hash per project, never every correction)."""
    feedback = current.require_feedback()
    rows = []
    for project in feedback.projects():
        versions = feedback.aggregates(project)
        active = current.served_version(project)
        corrections = sum(v["corrections"] for v in versions.values())
        ious = [(t, n) for v in versions.values() for kind in IOU_KINDS for t, n in v[kind].values()]
        on_active = versions.get(active, {})
        rows.append({
            "project": project, "active": active, "corrections": corrections,
            "unchanged_share": sum(v["unchanged"] for v in versions.values()) / corrections if corrections else None,
            "active_unchanged": on_active["unchanged"] / on_active["corrections"] if on_active.get("corrections")
            else None,
            "mean_iou": sum(t for t, _ in ious) / sum(n for _, n in ious) if sum(n for _, n in ious) else None,
            "last_at": feedback.last_correction_at(project),
        })  # fmt: skip
    rows.sort(key=lambda row: row["last_at"] or 0, reverse=True)
    return rows
