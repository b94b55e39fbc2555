"""The one model a worker process serves: loaded once, before work starts, kept warm between jobs."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from common.errors import ModelUnavailable
from common.settings import Settings
from common.versions import Registry
from worker.checkpoints import read_version
from worker.loading import load_clip
from worker.predictor import Predictor

log = logging.getLogger(__name__)

#: Trained versions kept loaded besides the base model (a ViT-B/16 copy is about 350 MB).
VERSIONS_IN_MEMORY = 2


class ModelProvider:
    """Loads the predictor on first use (or at ``load()``) and remembers a failure, so a worker
    that cannot load its model reports why instead of retrying on every job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._predictor: Predictor | None = None
        self._error: str | None = None
        self._state = "not loaded"
        self._loaded_at: float | None = None
        self.registry = Registry(settings.model_dir, settings.model_version)
        self._versions: OrderedDict[str, Predictor] = OrderedDict()

    def get(self) -> Predictor:
        with self._lock:
            if self._predictor is None and self._error is None:
                self._load()
            if self._predictor is None:
                raise ModelUnavailable(self._error or "The model is not loaded.")
            return self._predictor

    def _load(self) -> None:
        self._state = "loading"
        started = time.perf_counter()
        try:
            bundle = load_clip(self.settings)
        except ModelUnavailable as e:
            self._state, self._error = "failed", str(e)
            log.error("model failed to load: %s", e)
            return
        predictor = Predictor(self.settings, bundle)
        predictor.warm_up()
        self._predictor = predictor
        self._state, self._loaded_at = "ready", time.time()
        log.info("model %s ready in %.1f s", self.settings.model_version, time.perf_counter() - started)

    def for_version(self, version: str, project: str | None) -> Predictor:
        """The predictor for ``version``: the base model, or a project's trained version loaded
        from the registry (the last few stay in memory; they share the base's text cache)."""
        base = self.get()
        if version == self.settings.model_version:
            return base
        if not project or not version.startswith(self.settings.model_version + "+"):
            raise ModelUnavailable(
                f"This worker serves model version {self.settings.model_version} and its trained versions, but "
                f"the job asks for {version}: give the backend and the workers the same MODEL_* and algorithm settings."
            )
        with self._lock:
            if version in self._versions:
                self._versions.move_to_end(version)
                return self._versions[version]
            predictor = self._load_version(base, project, version)
            self._versions[version] = predictor
            while len(self._versions) > VERSIONS_IN_MEMORY:
                self._versions.popitem(last=False)
            return predictor

    def _load_version(self, base: Predictor, project: str, version: str) -> Predictor:
        """A trained version from the registry; one that is missing, corrupt or does not fit this
        base is refused with the reason."""
        try:
            loaded = read_version(self.registry, project, version, base.bundle.visual)
        except Exception as e:  # any failure here means this version cannot serve
            raise ModelUnavailable(f"Cannot load version {version} of project {project}: {e}") from e
        log.info("loaded version %s of project %s", version, project)
        return base.with_weights(*loaded)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"state": self._state, "version": self.settings.model_version}
        if self._error:
            status["error"] = self._error
        if self._predictor is not None:
            status["device"] = str(self._predictor.bundle.device)
            status["precision"] = str(self._predictor.bundle.precision).removeprefix("torch.")
            status["weights"] = self._predictor.bundle.description
        return status

    def identity(self) -> dict[str, Any]:
        """Who ran a job: lets operators (and tests) see that one process served many jobs."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "model_loaded_at": self._loaded_at}
