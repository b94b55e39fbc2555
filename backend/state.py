"""What the routes work with: one ``State`` per app, built by ``create_app`` from the settings."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app

from backend.feedback import Feedback
from backend.project_settings import ProjectSettings
from backend.runner import Runner
from backend.scheduler import TrainingScheduler
from backend.serving import Server
from backend.webhook_secret import WebhookSecurer
from common.errors import ServiceUnavailable
from common.settings import Settings, project_version
from common.versions import Registry


@dataclass(frozen=True)
class State:
    settings: Settings
    connection: redis.Redis | None  # None in embedded mode (no REDIS_URL)
    runner: Runner
    server: Server  # the prediction cache and late jobs, in front of the runner
    registry: Registry
    training: TrainingScheduler | None  # None without Redis: training needs the queue
    feedback: Feedback | None
    securer: WebhookSecurer
    project_settings: ProjectSettings  # each project's extra_params, from its last /setup

    def served_version(self, project: str | None) -> str:
        """The version a project's predictions carry: its active one, with its own settings."""
        return project_version(self.registry.active(project), self.project_settings.get(project))

    def require_training(self) -> TrainingScheduler:
        if self.training is None:
            raise ServiceUnavailable("Training runs on the 'train' queue: set REDIS_URL and start a training worker.")
        return self.training

    def require_feedback(self) -> Feedback:
        if self.feedback is None:
            raise ServiceUnavailable("The correction report lives in Redis: set REDIS_URL.")
        return self.feedback


def state() -> State:
    """The current app's state (inside a request)."""
    return current_app.extensions["prelabel"]
