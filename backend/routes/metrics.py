"""What operators and dashboards read: ``/metrics`` in Prometheus' text format (traffic, queues,
workers and correction figures) and ``/report`` (labor saved, per project and model version).

Request counters are per backend process (one gunicorn process by default); queue, worker and
correction figures come from Redis and are the same from every process.
"""

from __future__ import annotations

import threading

from flask import Blueprint, Response, jsonify, request
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from backend.feedback import IOU_KINDS
from backend.routes import known_project
from backend.state import State, state
from common import keys
from common.jobs import PREDICT_QUEUE, TRAIN_QUEUE, AllowListedJob

bp = Blueprint("metrics", __name__)

_lock = threading.Lock()
_predict = {"requests": 0, "tasks": 0, "failed": 0, "seconds": 0.0}


def record_predict(tasks: int, failed: int, seconds: float) -> None:
    with _lock:
        _predict["requests"] += 1
        _predict["tasks"] += tasks
        _predict["failed"] += failed
        _predict["seconds"] += seconds


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(34), chr(39))}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


@bp.get("/metrics")
def prometheus():
    return Response(render(state()), mimetype="text/plain; version=0.0.4")


@bp.get("/report")
def report():
    """Labor saved: per project and model version, how predictions fared against corrections."""
    feedback = state().require_feedback()
    return jsonify(feedback.report(known_project(request.args.get("project"), feedback.projects)))


def render(current: State) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{_labels(**labels)} {value}" for labels, value in samples)

    with _lock:
        snapshot = dict(_predict)
    metric("prelabel_predict_requests_total", "counter", "/predict calls answered.", [({}, snapshot["requests"])])
    metric("prelabel_predict_tasks_total", "counter", "Tasks predicted.", [({}, snapshot["tasks"])])
    metric("prelabel_predict_failed_tasks_total", "counter", "Tasks whose image failed.", [({}, snapshot["failed"])])
    metric("prelabel_predict_seconds_sum", "counter", "Time spent answering /predict.", [({}, snapshot["seconds"])])
    if current.connection is not None and current.feedback is not None:
        connection = current.connection
        depth, workers = [], []
        for name in (PREDICT_QUEUE, TRAIN_QUEUE):
            queue = Queue(name, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
            depth.append(({"queue": name}, queue.count))
            workers.append(({"queue": name}, Worker.count(queue=queue)))
        metric("prelabel_queue_depth", "gauge", "Jobs waiting in each queue.", depth)
        metric("prelabel_workers", "gauge", "Workers listening on each queue.", workers)
        gpu = [({"worker": w.decode()}, float(v)) for w, v in connection.hgetall(keys.GPU_MEMORY).items()]
        metric("prelabel_worker_gpu_memory_bytes", "gauge", "GPU memory held by each worker after its last job.", gpu)
        corrections, unchanged = [], []
        ious: dict[str, list] = {kind: [] for kind in IOU_KINDS}
        for project, versions in current.feedback.report().items():
            for version, row in versions.items():
                corrections.append(({"project": project, "version": version}, row["corrections"]))
                unchanged.append(({"project": project, "version": version}, round(row["unchanged_share"], 4)))
                for kind in IOU_KINDS:
                    ious[kind] += [({"project": project, "version": version, "label": label}, round(iou, 4))
                                   for label, iou in row[kind].items()]  # fmt: skip
        metric("prelabel_corrections", "gauge", "Annotations compared with their prediction.", corrections)
        metric("prelabel_accepted_unchanged_ratio", "gauge", "Share of predictions accepted as they were.", unchanged)
        metric("prelabel_mask_iou", "gauge", "Mean IoU of predicted and corrected masks.", ious["mask_iou"])
        metric("prelabel_box_iou", "gauge", "Mean IoU of predicted and corrected boxes.", ious["box_iou"])
        metric("prelabel_polygon_iou", "gauge", "Mean IoU of predicted and corrected polygons.", ious["polygon_iou"])
    return "\n".join(lines) + "\n"
