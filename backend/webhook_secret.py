"""Let Label Studio's event webhooks through without opening /webhook to everyone.

Adding an ML backend makes Label Studio create a project webhook ``<backend url>/webhook`` that
sends events with no auth headers (PROTOCOL.md section 2). With ``WEBHOOK_SECRET`` set, prelabel
accepts an event that carries ``X-Prelabel-Secret: <project id>:<the project's secret>``, where a
project's secret is an HMAC of its id under ``WEBHOOK_SECRET``: anyone who can read one project's
webhook settings (its managers) cannot forge events for another project. The header names its
project so that it is checked before the body is read: a request without it costs no parsing.

With ``PRELABEL_URL`` set (this backend's URL as Label Studio calls it), prelabel adds that header
to the project's webhook whose URL is ``PRELABEL_URL/webhook`` through Label Studio's API, and to
no other: another ML backend connected to the same project never receives it. Without
``PRELABEL_URL``, add it by hand (Project > Settings > Webhooks); ``prelabel-backend
--webhook-header <project id>`` prints it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Iterable

from common.labelstudio.client import describe_failure, label_studio_client
from common.projects import project_id
from common.settings import Settings

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Prelabel-Secret"
_SECRET_FORM = re.compile(r"(\d{1,18}):[0-9a-f]{64}", re.ASCII)


def project_secret(secret: str, project: int) -> str:
    """The value of ``X-Prelabel-Secret`` for Label Studio project ``project`` (its numeric id)."""
    digest = hmac.new(secret.encode(), f"prelabel-webhook:{project}".encode(), hashlib.sha256).hexdigest()
    return f"{project}:{digest}"


def secret_project(value: str | None) -> int | None:
    """The project id an ``X-Prelabel-Secret`` value names, or None when it has not that form."""
    match = _SECRET_FORM.fullmatch(value or "")
    return int(match[1]) if match else None


def webhook_url(prelabel_url: str) -> str:
    """The URL of the webhook Label Studio creates for an ML backend at ``prelabel_url``."""
    return _normalised(prelabel_url.rstrip("/") + "/webhook")


def _normalised(url: str) -> str:
    return re.sub(r"/+webhook/*$", "/webhook", url.strip())


def secure_project_webhooks(settings: Settings, project: str) -> bool:
    """Add the project's secret header to its webhook that points at this backend. Returns True
    once it carries it (False while Label Studio has no such webhook yet)."""
    assert settings.prelabel_url and settings.webhook_secret
    pid = project_id(project)
    ours = webhook_url(settings.prelabel_url)
    value = project_secret(settings.webhook_secret, pid)
    with label_studio_client(settings, "Securing the project's webhook") as client:
        hooks = [hook for hook in client.webhooks.list(project=str(pid)) if _normalised(hook.url or "") == ours]
        for hook in hooks:
            headers = dict(hook.headers or {})
            if headers.get(SECRET_HEADER) != value:
                headers[SECRET_HEADER] = value
                client.webhooks.update(hook.id, headers=headers)
                log.info("project %s: added the webhook secret header to webhook %s (%s)", project, hook.id, hook.url)
    return bool(hooks)


class WebhookSecurer:
    """Runs ``secure_project_webhooks`` in the background, until it succeeds once per project."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = bool(
            settings.webhook_secret and settings.prelabel_url and settings.label_studio_url
            and settings.label_studio_api_key
        )  # fmt: skip
        if settings.webhook_secret and not settings.prelabel_url:
            log.warning("WEBHOOK_SECRET is set but PRELABEL_URL is not: add the %s header to each project's "
                        "webhook by hand (`prelabel-backend --webhook-header <project id>` prints it)",
                        SECRET_HEADER)  # fmt: skip
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def schedule(self, project: str) -> None:
        self.schedule_all([project])

    def schedule_all(self, projects: Iterable[str]) -> None:
        """In one thread, one project after the other; at start, for every project prelabel knows:
        their header may predate this version's form (``<id>:<HMAC>``), and Label Studio calls
        /setup only now and then."""
        with self._lock:
            todo = [project for project in projects if self.enabled and project not in self._done]
            self._done.update(todo)  # retried by a later call if it does not succeed
        if todo:
            threading.Thread(target=lambda: [self._run(project) for project in todo], daemon=True,
                             name="prelabel-webhook-secret").start()  # fmt: skip

    def _run(self, project: str) -> None:
        try:
            secured = secure_project_webhooks(self.settings, project)
        except Exception as e:  # Label Studio unreachable, key without rights...: try on a later /setup
            log.warning("project %s: could not add the webhook secret header: %s", project, describe_failure(e))
            secured = False
        if not secured:
            with self._lock:
                self._done.discard(project)
