"""Let Label Studio's event webhooks through without opening /webhook to everyone.

Adding an ML backend makes Label Studio create a project webhook ``<backend url>/webhook`` that
sends events with no auth headers (PROTOCOL.md section 2). With ``WEBHOOK_SECRET`` set, prelabel
accepts a webhook that carries ``X-Prelabel-Secret: <secret>``, and adds that header to its own
webhooks through Label Studio's API (the admin can also add it by hand in the project's
Webhooks settings).
"""

from __future__ import annotations

import logging
import threading

from label_studio_sdk import LabelStudio

from backend.projects import project_id
from backend.settings import Settings

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Prelabel-Secret"


def secure_project_webhooks(settings: Settings, project: str) -> bool:
    """Add the secret header to ``project``'s webhooks that point at one of its ML backends.
    Returns True once every such webhook carries it (False while Label Studio has none yet)."""
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)
    pid = project_id(project)
    urls = {backend.url.rstrip("/") + "/webhook" for backend in client.ml.list(project=pid)}
    hooks = [hook for hook in client.webhooks.list(project=str(pid)) if hook.url in urls]
    for hook in hooks:
        headers = dict(hook.headers or {})
        if headers.get(SECRET_HEADER) != settings.webhook_secret:
            headers[SECRET_HEADER] = settings.webhook_secret
            client.webhooks.update(hook.id, headers=headers)
            log.info("project %s: added the webhook secret header to webhook %s (%s)", project, hook.id, hook.url)
    return bool(hooks)


class WebhookSecurer:
    """Runs ``secure_project_webhooks`` in the background, until it succeeds once per project."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = bool(settings.webhook_secret and settings.label_studio_url and settings.label_studio_api_key)
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def schedule(self, project: str) -> None:
        with self._lock:
            if not self.enabled or project in self._done:
                return
            self._done.add(project)  # retried below if it does not succeed
        threading.Thread(target=self._run, args=(project,), daemon=True, name="prelabel-webhook-secret").start()

    def _run(self, project: str) -> None:
        try:
            secured = secure_project_webhooks(self.settings, project)
        except Exception as e:  # Label Studio unreachable, key without rights...: try on a later /setup
            log.warning("project %s: could not add the webhook secret header: %s", project, e)
            secured = False
        if not secured:
            with self._lock:
                self._done.discard(project)
