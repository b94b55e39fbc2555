"""The Flask app: Label Studio's ML backend protocol on top of a job runner, plus the model
versions, training jobs and correction report a project manager uses.

Every handler validates, hands work to the runner or a queue and answers within Label Studio's
timeouts (/health 1 s, /setup 3 s, /predict 100 s, event webhooks 1 s). No model code runs here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from backend import metrics, webhooks
from backend.auth import check_request
from backend.feedback import Feedback
from backend.runner import QueueRunner, Runner, make_runner, redis_unreachable
from backend.scheduler import Training
from backend.serving import Server, per_job, predict_job
from backend.serving import image_url as _image_url
from backend.webhook_secret import WebhookSecurer
from common.errors import BadRequest, JobTimeout, PrelabelError, ServiceUnavailable
from common.jobs import PREDICT_QUEUE
from common.labelstudio.config import parse_label_config
from common.labelstudio.predictions import to_label_studio
from common.logs import redact_urls
from common.projects import project_uid
from common.settings import Settings
from common.versions import Registry

log = logging.getLogger(__name__)

MODEL_CLASS = "TagCLIP"
MAX_REQUEST_BYTES = 64 * 1024 * 1024

bp = Blueprint("prelabel", __name__)


@dataclass(frozen=True)
class State:
    settings: Settings
    runner: Runner
    registry: Registry
    training: Training | None  # None without Redis: training needs the queue
    feedback: Feedback | None
    securer: WebhookSecurer
    server: Server | None  # the cache and late jobs, in queue mode

    def require_training(self) -> Training:
        if self.training is None:
            raise ServiceUnavailable("Training runs on the 'train' queue: set REDIS_URL and start a training worker.")
        return self.training


def create_app(settings: Settings | None = None, runner: Runner | None = None) -> Flask:
    """Build the app. ``settings`` default to the environment; ``runner`` to the one they imply."""
    settings = settings or Settings.from_env()
    runner = runner or make_runner(settings)
    connection = runner.connection if isinstance(runner, QueueRunner) else None
    registry = Registry(settings.model_dir, settings.model_version, connection)
    training = Training(settings, connection, registry) if connection is not None else None
    feedback = Feedback(connection, settings.max_image_pixels) if connection is not None else None
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    if not settings.auth_enabled:
        # Unauthenticated, the backend serves this machine only (see backend/cli.py); a web page
        # that rebinds its own name to 127.0.0.1 still sends its name as Host, and is refused.
        app.config["TRUSTED_HOSTS"] = trusted_hosts(settings)
    app.extensions["prelabel"] = State(
        settings=settings,
        runner=runner,
        registry=registry,
        training=training,
        feedback=feedback,
        securer=WebhookSecurer(settings),
        server=Server(settings, runner) if isinstance(runner, QueueRunner) else None,
    )
    app.before_request(lambda: check_request(request, settings))
    app.register_blueprint(bp)
    app.register_error_handler(PrelabelError, _prelabel_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(redis.exceptions.ConnectionError, _redis_error)
    app.register_error_handler(redis.exceptions.TimeoutError, _redis_error)
    app.register_error_handler(Exception, _unexpected_error)
    log.info("prelabel backend ready: mode=%s model_version=%s auth=%s", runner.mode, settings.model_version,
             "basic" if settings.auth_enabled else "off")  # fmt: skip
    return app


def trusted_hosts(settings: Settings) -> list[str]:
    """The Host headers an unauthenticated backend answers: loopback names and PRELABEL_URL's host."""
    hosts = ["localhost", "127.0.0.1"]
    if settings.prelabel_url:
        hosts.append(urlsplit(settings.prelabel_url).hostname or "localhost")
    return hosts


def start_background(app: Flask) -> None:
    """The backend's own threads: the scheduled training sweep and the comparison of corrections.
    ``prelabel-backend`` starts them in each server process; an app built only for a test has none."""
    state: State = app.extensions["prelabel"]
    if state.training is not None:
        state.training.start_schedule()
    if state.feedback is not None:
        state.feedback.start_comparing()


def _state() -> State:
    return current_app.extensions["prelabel"]


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _project(value: Any) -> str | None:
    return project_uid(value) if value not in (None, "") else None


@bp.get("/health")
def health():
    state = _state()
    try:
        details = state.runner.health()
    except ServiceUnavailable as e:
        return jsonify(status="DOWN", model_class=MODEL_CLASS, error=str(e)), 503
    return jsonify(
        status="UP",
        model_class=MODEL_CLASS,
        model_version=state.settings.model_version,
        random_weights=state.settings.random_weights,
        **details,
    )


@bp.post("/setup")
def setup():
    """Called after every /health: check the label config, report the project's active version.
    No model work."""
    state = _state()
    body = _json_body()
    schema = body.get("schema") or ""
    parse_label_config(schema, state.settings.max_labels)
    error = state.runner.setup_error()
    if error:
        raise ServiceUnavailable(error)
    project = _project(body.get("project"))
    if project and state.training is not None:
        state.training.remember_project(project, schema)
    if project:
        state.securer.schedule(project)
    return jsonify(model_version=state.registry.active(project))


@bp.post("/predict")
def predict():
    state = _state()
    body = _json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) and "id" in t for t in tasks):
        raise BadRequest("'tasks' must be a non-empty list of task objects, each with an 'id'.")
    label_config = body.get("label_config") or ""
    spec = parse_label_config(label_config, state.settings.max_labels)
    project = _project(body.get("project"))
    version = state.registry.active(project)
    images = [_image_url(t, spec.image_key) for t in tasks]
    started = time.perf_counter()
    cached = 0
    if state.server is not None:
        predictions, cached = state.server.predict(tasks, spec, label_config, project, version, images)
    else:
        predictions = _predict_embedded(state, tasks, spec, project, version, images)
    seconds = time.perf_counter() - started
    empty = sum(1 for p in predictions if not p)
    metrics.record_predict(len(tasks), empty, seconds)
    if project and state.feedback is not None:
        served = {task["id"]: p for task, p in zip(tasks, predictions, strict=True) if p}
        state.feedback.remember_predictions(project, served)
    log.info("predict: %d tasks (%d cached, %d without prediction) in %.0f ms, model %s, project %s",
             len(tasks), cached, empty, seconds * 1000, version, project)  # fmt: skip
    return jsonify(results=predictions)


def _predict_embedded(
    state: State, tasks: list[dict], spec, project: str | None, version: str, images: list[str | None]
) -> list[Any]:
    """In-process, MAX_TASKS_PER_JOB tasks at a time, until PREDICT_TIMEOUT: the tasks left then get
    no prediction, and Label Studio asks for them again on the next Retrieve Predictions."""
    deadline = time.monotonic() + state.settings.predict_timeout
    predictions: list[Any] = []
    for chunk in per_job(range(len(tasks)), state.settings.max_tasks_per_job):
        if time.monotonic() >= deadline:
            break
        job = predict_job(spec, project, version, [tasks[i] for i in chunk], [images[i] for i in chunk])
        try:
            predictions += to_label_studio(state.runner.predict(job), spec, version)
        except JobTimeout as e:
            log.warning("%s", e)
            break
    return predictions + [[] for _ in tasks[len(predictions) :]]


@bp.post("/webhook")
def webhook():
    """Project events and Start Training. Answers at once: Label Studio waits on it (an
    annotator's submit, with "start training on annotation submission"); training is enqueued."""
    return jsonify(webhooks.handle(_json_body(), _state()))


@bp.get("/versions")
def versions():
    """The versions Label Studio can show; ``?project=<uid>`` adds each version's report."""
    state = _state()
    project = _project(request.args.get("project"))
    trained = state.registry.versions(project) if project else []
    active = state.registry.active(project)
    body: dict[str, Any] = {"versions": [state.settings.model_version] + [v.version for v in trained]}
    if project:
        body["active"] = active
        body["details"] = [
            {"version": v.version, "created_at": v.created_at, "promoted": v.promoted, "reason": v.reason,
             "metrics": v.metrics, "trained_on": len(v.trained_on), "active": v.version == active}
            for v in trained
        ]  # fmt: skip
    return jsonify(body)


@bp.post("/versions/<path:version>/activate")
def activate(version: str):
    """Make ``version`` (or the base model) the project's active one: rollback, or a manual promotion."""
    state = _state()
    project = _project(_json_body().get("project"))
    if project is None:
        raise BadRequest("Say which project: {'project': '<id>.<created_at>'} (as /setup receives it).")
    state.registry.activate(project, version)
    log.info("project %s: version %s activated by request", project, version)
    return jsonify(project=project, active=version)


@bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """A training run's progress and result, or a predict job's status and task counts. Errors
    carry no URL query strings or userinfo."""
    job = _state().require_training().job(job_id)
    status = job.get_status()
    result = job.latest_result()
    value = result.return_value if result is not None and result.type == result.Type.SUCCESSFUL else None
    if value is not None and job.origin == PREDICT_QUEUE:  # the masks are Label Studio's to show
        value = {"tasks": len(value["tasks"]), "failed": sum(1 for t in value["tasks"] if t.get("error"))}
    error = (result.exc_string or "").strip().splitlines()[-1:] if result is not None and result.exc_string else None
    return jsonify(
        id=job.id,
        description=job.description,
        status=status.value if status else None,
        progress=job.meta.get("progress"),
        enqueued_at=job.enqueued_at.isoformat() if job.enqueued_at else None,
        started_at=job.started_at.isoformat() if job.started_at else None,
        ended_at=job.ended_at.isoformat() if job.ended_at else None,
        result=value,
        error=[redact_urls(line) for line in error] if error else None,
    )


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    return jsonify(_state().require_training().cancel(job_id))


@bp.get("/report")
def report():
    """Labor saved: per project and model version, how predictions fared against corrections."""
    state = _state()
    if state.feedback is None:
        raise ServiceUnavailable("The correction report lives in Redis: set REDIS_URL.")
    return jsonify(state.feedback.report(_project(request.args.get("project"))))


@bp.get("/metrics")
def prometheus():
    state = _state()
    text = metrics.render(state)
    return Response(text, mimetype="text/plain; version=0.0.4")


def _prelabel_error(e: PrelabelError):
    log.log(logging.ERROR if e.status >= 500 else logging.INFO, "%s %s -> %d: %s",
            request.method, request.path, e.status, e)  # fmt: skip
    return jsonify(error=str(e), type=type(e).__name__), e.status


def _redis_error(e: redis.exceptions.RedisError):
    """Every route that touches Redis answers 503 naming it while Redis is away."""
    return _prelabel_error(redis_unreachable(_state().settings.redis_url or "", e))


def _http_error(e: HTTPException):
    return jsonify(error=e.description, type=type(e).__name__), e.code or 500


def _unexpected_error(e: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(error=f"Internal error: {type(e).__name__}", type="InternalError"), 500
