"""The Flask app: builds the ``State`` from the settings, registers the route blueprints
(``backend/routes/``) and turns errors into JSON answers with their HTTP status.

Every handler validates, hands work to the runner or a queue and answers within Label Studio's
timeouts (/health 1 s, /setup 3 s, /predict 100 s, event webhooks 1 s). No model code runs here.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.auth import check_request
from backend.deliveries import Deliveries
from backend.feedback import Feedback
from backend.project_settings import ProjectSettings
from backend.routes import admin, dashboard, metrics, protocol
from backend.runner import make_runner, redis_connection, redis_unreachable
from backend.scheduler import TrainingScheduler
from backend.serving import MemoryCache, RedisCache, Server
from backend.state import State, state
from backend.webhook_secret import WebhookSecurer
from common.errors import PrelabelError
from common.settings import Settings
from common.versions import Registry

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024 * 1024


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; ``settings`` default to the environment. With ``REDIS_URL`` jobs go to the
    queue; without it they run in this process (embedded mode)."""
    settings = settings or Settings.from_env()
    connection = redis_connection(settings) if settings.redis_url else None
    runner = make_runner(settings, connection)
    registry = Registry(settings.model_dir, settings.model_version, connection)
    cache = RedisCache(connection) if connection is not None else MemoryCache()
    feedback = Feedback(connection, settings.max_image_pixels) if connection is not None else None
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    if not settings.auth_enabled:
        # Unauthenticated, the backend serves this machine only (see backend/cli.py); a web page
        # that rebinds its own name to 127.0.0.1 still sends its name as Host, and is refused.
        app.config["TRUSTED_HOSTS"] = trusted_hosts(settings)
    project_settings = ProjectSettings(settings, connection)
    training = TrainingScheduler(settings, connection, registry, project_settings) if connection is not None else None
    app.extensions["prelabel"] = State(
        settings=settings,
        connection=connection,
        runner=runner,
        server=Server(
            settings,
            runner,
            cache,
            feedback.remember_predictions if feedback is not None else None,
            Deliveries(connection, settings.kept_ttl) if connection is not None else None,
        ),
        registry=registry,
        training=training,
        feedback=feedback,
        securer=WebhookSecurer(settings),
        project_settings=project_settings,
    )
    app.before_request(lambda: check_request(request, settings))
    for blueprint in (protocol.bp, admin.bp, metrics.bp, dashboard.bp):
        app.register_blueprint(blueprint)
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
    """The backend's own threads: the scheduled training sweep, the comparison of corrections, the
    webhook secret header of every known project and the heartbeat that delivers late jobs.
    ``prelabel-backend`` starts them in each server process; an app built only for a test has none."""
    current: State = app.extensions["prelabel"]
    if current.training is not None:
        current.training.start_schedule()
        try:
            current.securer.schedule_all(current.training.known_projects())
        except redis.exceptions.RedisError as e:  # Redis not up yet: each project's next /setup does it
            log.warning("webhook secret headers not checked at start: Redis: %s", e)
    if current.feedback is not None:
        current.feedback.start_comparing()
    current.server.start_delivering()


def _prelabel_error(e: PrelabelError):
    log.log(logging.ERROR if e.status >= 500 else logging.INFO, "%s %s -> %d: %s",
            request.method, request.path, e.status, e)  # fmt: skip
    return jsonify(error=str(e), type=type(e).__name__), e.status


def _redis_error(e: redis.exceptions.RedisError):
    """Every route that touches Redis answers 503 naming it while Redis is away."""
    return _prelabel_error(redis_unreachable(state().settings.redis_url or "", e))


def _http_error(e: HTTPException):
    return jsonify(error=e.description, type=type(e).__name__), e.code or 500


def _unexpected_error(e: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(error=f"Internal error: {type(e).__name__}", type="InternalError"), 500
