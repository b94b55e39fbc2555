"""Each project's own settings: the "Extra params" of its model connection in Label Studio.

Label Studio sends them with every /setup, never with /predict, so the backend keeps the last
checked ones per project (in Redis, shared by every backend process, or in memory without it)
and puts them into the project's jobs. Environment variables stay the defaults.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import redis

from common import keys
from common.errors import BadRequest, SettingsError
from common.settings import Settings


class ProjectSettings:
    def __init__(self, settings: Settings, connection: redis.Redis | None) -> None:
        self.settings = settings
        self.connection = connection
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def update(self, project: str, extra_params: object) -> dict[str, Any]:
        """Check and keep ``project``'s extra_params; returns them by environment name ({} for none).

        Raises:
            BadRequest: a setting that is not per project, or a value the environment would refuse too.
        """
        try:
            overrides = self.settings.project_overrides(extra_params)
        except SettingsError as e:
            raise BadRequest(str(e)) from e
        # by environment name, values as parsed ("0.2" and 0.2 are the same settings, one version),
        # only those that differ from the environment's
        kept = {
            name.upper(): list(value) if isinstance(value, tuple) else value
            for name, value in sorted(overrides.items())
            if getattr(self.settings, name) != value
        }
        if self.connection is None:
            with self._lock:
                self._memory[project] = kept
        elif kept:
            self.connection.hset(keys.PROJECT_SETTINGS, project, json.dumps(kept))
        else:
            self.connection.hdel(keys.PROJECT_SETTINGS, project)
        return kept

    def get(self, project: str | None) -> dict[str, Any]:
        """The project's settings as its last /setup sent them ({} for none, or no project)."""
        if project is None:
            return {}
        if self.connection is None:
            with self._lock:
                return dict(self._memory.get(project, {}))
        raw = self.connection.hget(keys.PROJECT_SETTINGS, project)
        return json.loads(raw) if raw else {}
