"""``prelabel-backend``: serve the app with gunicorn (threads, no fork after the app loads)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gunicorn.app.base import BaseApplication

from backend.app import create_app
from backend.errors import SettingsError
from backend.logs import configure_logging
from backend.settings import Settings

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
        return create_app(self.settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prelabel-backend", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="default 9090")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn processes (queue mode only)")
    parser.add_argument("--threads", type=int, default=8, help="threads per process: concurrent requests")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as e:
        sys.exit(f"prelabel-backend: {e}")
    configure_logging(settings.log_level)
    workers = args.workers
    if settings.embedded and workers != 1:
        log.warning("REDIS_URL is unset (embedded mode): using 1 process so the model loads once")
        workers = 1
    _Server(
        settings,
        {
            "bind": f"{args.host}:{args.port}",
            "workers": workers,
            "threads": args.threads,
            "worker_class": "gthread",
            # A /predict may legitimately wait PREDICT_TIMEOUT seconds for its job.
            "timeout": int(settings.predict_timeout) + 30,
            "accesslog": "-",
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "preload_app": False,
        },
    ).run()


if __name__ == "__main__":
    main()
