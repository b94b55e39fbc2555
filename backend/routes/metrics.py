"""What operators and dashboards read: ``/metrics`` in Prometheus' text format (see
``backend/prometheus.py``) and ``/report`` (labor saved, per project and model version)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from backend import prometheus
from backend.routes import known_project
from backend.state import state

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    current = state()
    collector = None
    if current.connection is not None and current.feedback is not None:
        collector = prometheus.RedisCollector(current.connection, current.feedback, current.served_version)
    text = prometheus.render(current.settings.prometheus_multiproc_dir, collector)
    return Response(text, content_type=CONTENT_TYPE_LATEST)


@bp.get("/report")
def report():
    """Labor saved: per project and model version, how predictions fared against corrections."""
    feedback = state().require_feedback()
    return jsonify(feedback.report(known_project(request.args.get("project"), feedback.projects)))
