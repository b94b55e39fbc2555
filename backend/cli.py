"""``prelabel-backend``: serve the app with gunicorn (threads, no fork after the app loads).

Safe by default: without basic auth it binds 127.0.0.1 only, and it refuses to serve another
interface without auth (the backend can run jobs with the Label Studio API key)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import tempfile
from pathlib import Path

from gunicorn.app.base import BaseApplication

from backend.webhook_secret import SECRET_HEADER, project_secret
from common.errors import SettingsError
from common.logs import configure_logging
from common.settings import Settings

log = logging.getLogger(__name__)


class _Server(BaseApplication):
    """gunicorn, configured from code. The app is built inside the gunicorn worker, after the
    fork, so an embedded model never crosses a fork (CUDA cannot be re-initialised in a child)."""

    def __init__(self, settings: Settings, options: dict[str, object]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from backend.app import create_app, start_background  # after PROMETHEUS_MULTIPROC_DIR is set

        app = create_app(self.settings)
        start_background(app)
        return app


def _metrics_directory() -> None:
    """Where gunicorn's processes keep their Prometheus metrics, so that a scrape of any of them
    sums all: PROMETHEUS_MULTIPROC_DIR, or a new directory. Its metric files (``*.db``, nothing
    else) are removed at start: a restart begins counting again, as Prometheus expects."""
    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="prelabel-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _worker_exited(server, worker) -> None:
    """gunicorn's child_exit hook: a dead process's live gauges must not linger in the sum."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prelabel-backend", description=__doc__)
    parser.add_argument("--host", help="interface to bind (default: 0.0.0.0 with basic auth, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="default 9090")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)),
                        help="gunicorn processes (queue mode only; default WORKERS or 1)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 8)),
                        help="threads per process: concurrent requests (default THREADS or 8)")  # fmt: skip
    parser.add_argument("--webhook-header", type=int, metavar="PROJECT_ID",
                        help="print the webhook header for a Label Studio project and exit")  # fmt: skip
    args = parser.parse_args(argv)

    if args.webhook_header is None:
        _metrics_directory()  # before the settings read it, and before prometheus_client is imported
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        sys.exit(f"prelabel-backend: {e}")
    if args.webhook_header is not None:
        if not settings.webhook_secret:
            sys.exit("prelabel-backend: set WEBHOOK_SECRET first (the header is derived from it).")
        print(f"{SECRET_HEADER}: {project_secret(settings.webhook_secret, args.webhook_header)}")
        return
    host = args.host or ("0.0.0.0" if settings.auth_enabled else "127.0.0.1")
    if not settings.auth_enabled and not _is_loopback(host):
        sys.exit(
            f"prelabel-backend: refusing to serve {host} without auth: anyone who reaches it could run jobs with "
            "your Label Studio API key and change model versions. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and "
            "the same pair in Label Studio's model settings), or bind 127.0.0.1."
        )
    configure_logging(settings.log_level)
    if settings.auth_enabled and not settings.webhook_secret:
        log.warning("basic auth is on and WEBHOOK_SECRET is unset: Label Studio's event webhooks (which carry no "
                    "auth) are refused, so corrections reach prelabel only through training runs")  # fmt: skip
    workers = args.workers
    if settings.embedded and workers != 1:
        log.warning("REDIS_URL is unset (embedded mode): using 1 process so the model loads once")
        workers = 1
    _Server(
        settings,
        {
            "bind": f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}",
            "workers": workers,
            "threads": args.threads,
            "worker_class": "gthread",
            # A /predict may legitimately wait PREDICT_TIMEOUT seconds for its job.
            "timeout": int(settings.predict_timeout) + 30,
            "accesslog": "-",
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "preload_app": False,
            "child_exit": _worker_exited,
        },
    ).run()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()
