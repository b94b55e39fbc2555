"""Label Studio's ML backend protocol (PROTOCOL.md sections 1-4): /health 1 s, /setup 3 s,
/predict 100 s, event webhooks 1 s. No model code runs here."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, jsonify

from backend import events
from backend.prometheus import record_predict
from backend.routes import json_body, optional_project
from backend.state import state
from common.errors import BadRequest, ServiceUnavailable
from common.labelstudio.annotations import image_url, is_task
from common.labelstudio.config import parse_label_config
from common.settings import project_version

log = logging.getLogger(__name__)

MODEL_CLASS = "TagCLIP"

bp = Blueprint("protocol", __name__)


@bp.get("/health")
def health():
    current = state()
    try:
        status = current.runner.status()
    except ServiceUnavailable as e:
        return jsonify(status="DOWN", model_class=MODEL_CLASS, error=str(e)), 503
    return jsonify(
        status="UP",
        model_class=MODEL_CLASS,
        model_version=current.settings.model_version,
        random_weights=current.settings.random_weights,
        **status.details,
    )


@bp.post("/setup")
def setup():
    """Called after every /health: check the label config, report the project's active version.
    No model work."""
    current = state()
    body = json_body()
    schema = body.get("schema") or ""
    parse_label_config(schema, current.settings.max_labels)
    misconfigured = current.runner.status().misconfigured
    if misconfigured:
        raise ServiceUnavailable(misconfigured)
    project = optional_project(body.get("project"))
    own_settings = current.project_settings.update(project, body.get("extra_params")) if project else {}
    if project and current.training is not None:
        current.training.remember_project(project, schema)
    if project:
        current.securer.schedule(project)
    return jsonify(model_version=project_version(current.registry.active(project), own_settings))


@bp.post("/predict")
def predict():
    current = state()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(is_task(t) for t in tasks):
        raise BadRequest("'tasks' must be a non-empty list of task objects, each with an integer 'id'.")
    label_config = body.get("label_config") or ""
    spec = parse_label_config(label_config, current.settings.max_labels)
    project = optional_project(body.get("project"))
    version = current.registry.active(project)
    own_settings = current.project_settings.get(project)
    images = [image_url(t, spec.image_key) for t in tasks]
    started = time.perf_counter()
    served = current.server.predict(tasks, spec, label_config, project, version, images, own_settings)
    seconds = time.perf_counter() - started
    empty = sum(1 for p in served.predictions if not p)
    record_predict(len(tasks), empty, seconds)
    if project and current.feedback is not None:
        ready = {task["id"]: p for task, p in zip(tasks, served.predictions, strict=True) if p}
        current.feedback.remember_predictions(project, ready)
    log.info("predict: %d tasks (%d cached, %d without prediction) in %.0f ms, model %s, project %s%s",
             len(tasks), served.cached, empty, seconds * 1000, project_version(version, own_settings), project,
             f", request {served.request}" if served.request else "")  # fmt: skip
    response = jsonify(results=served.predictions)
    if served.request:  # Label Studio reads only "results"; an operator follows /jobs/<request>
        response.headers["X-Prelabel-Request"] = served.request
    return response


@bp.post("/webhook")
def webhook():
    """Project events and Start Training. Answers at once: Label Studio waits on it (an
    annotator's submit, with "start training on annotation submission"); training is enqueued."""
    return jsonify(events.handle(json_body(), state()))
