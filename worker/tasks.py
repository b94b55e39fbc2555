"""RQ job functions. Thin on purpose: parse the payload, call the pipeline, return a dict.

The backend enqueues these by dotted path (``common.jobs.PREDICT_FUNCTION``). Exceptions
propagate so RQ records them as failed jobs, with the message the backend passes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from rq import get_current_job

from common import keys
from common.errors import ModelUnavailable
from common.jobs import PredictJob, TrainJob
from common.settings import Settings
from common.versions import Registry
from worker.progress import JobProgress, naming_shutdown
from worker.provider import ModelProvider
from worker.training.adapt import run_adaptation
from worker.training.run import run_training

log = logging.getLogger(__name__)

_provider: ModelProvider | None = None


def configure(settings: Settings) -> ModelProvider:
    """Set the process's model provider (done once by ``prelabel-worker`` or the embedded runner)."""
    global _provider
    _provider = ModelProvider(settings)
    return _provider


def provider() -> ModelProvider:
    if _provider is None:
        raise ModelUnavailable(
            "This process has no model configured: run jobs with `prelabel-worker`, which loads the "
            "model once, rather than a plain `rq worker`."
        )
    return _provider


def warm_up() -> None:
    """Load the model now; a failure is kept in ``model_status()`` rather than raised."""
    with contextlib.suppress(ModelUnavailable):
        provider().get()


def model_status() -> dict[str, Any]:
    return provider().status()


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one predict job (all tasks of one /predict call) and return ``PredictResult.to_dict()``."""
    job = PredictJob.from_dict(payload)
    models = provider()
    result = models.for_version(job.model_version, job.project).for_project(job.project_settings).predict(job)
    result = dataclasses.replace(result, worker=models.identity())
    rq_job = get_current_job()
    if rq_job is not None and rq_job.enqueued_at and rq_job.started_at:  # the wait for a worker, for /metrics
        queued = (rq_job.started_at - rq_job.enqueued_at).total_seconds() * 1000
        result.timings_ms["queued"] = round(max(0.0, queued), 1)
    if rq_job is not None and torch.cuda.is_available():
        rq_job.connection.hset(keys.GPU_MEMORY, rq_job.worker_name or "unknown", torch.cuda.memory_allocated())
    log.info(
        "predict job %s: %d tasks (%d failed), model %s, timings %s",
        rq_job.id if rq_job else "inline", len(result.tasks), sum(1 for t in result.tasks if t.error),
        job.served_version, result.timings_ms,
    )  # fmt: skip
    return result.to_dict()


def train(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one training run for a project (queue ``train``); returns its summary.

    Progress goes to the RQ job's meta (``GET /jobs/<id>`` shows it); the run stops between steps
    when the backend sets the job's cancel key or the worker is asked to stop; the active version
    only changes at the very end.
    """
    job = TrainJob.from_dict(payload)
    models = provider()
    rq_job = get_current_job()
    connection = rq_job.connection if rq_job else None
    registry = Registry(models.settings.model_dir, models.settings.model_version, connection)
    job_progress = JobProgress(rq_job, f"train (project {job.project})")
    log.info("train job %s: project %s from %s (trigger %s)", rq_job.id if rq_job else "inline", job.project,
             job.model_version, job.trigger)  # fmt: skip
    base = models.get()
    active = models.for_version(job.model_version, job.project)
    with naming_shutdown():
        return run_training(base, active, registry, job, job_progress.report, job_progress.should_stop)


def adapt(payload: dict[str, Any]) -> dict[str, Any]:
    """Fit a project's few-shot adapter and tag thresholds on its corrections (queue ``adapt``,
    served by the predict workers after their predictions); returns its summary."""
    job = TrainJob.from_dict(payload)
    models = provider()
    rq_job = get_current_job()
    connection = rq_job.connection if rq_job else None
    registry = Registry(models.settings.model_dir, models.settings.model_version, connection)
    # A queued job may have waited while a version was promoted: it builds on the active one now.
    job = dataclasses.replace(job, model_version=registry.active(job.project))
    job_progress = JobProgress(rq_job, f"adapt (project {job.project})")
    log.info("adapt job %s: project %s from %s (trigger %s)", rq_job.id if rq_job else "inline", job.project,
             job.model_version, job.trigger)  # fmt: skip
    active = models.for_version(job.model_version, job.project)
    with naming_shutdown():
        return run_adaptation(active, registry, job, job_progress.report, job_progress.should_stop)
