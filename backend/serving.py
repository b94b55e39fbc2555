"""Serving predictions fast: a cache in front of the queue, and work that outlives a request.

* Every prediction served is cached in Redis under (model version, label config, task id, image
  URL): asking again, or opening a task whose prediction was precomputed, costs a Redis read.
* Only the tasks missing from the cache become jobs, of at most MAX_TASKS_PER_JOB tasks each.
  When a job does not finish within PREDICT_TIMEOUT (a large Retrieve Predictions selection),
  /predict answers with what is ready and the job carries on; when it finishes, its predictions
  are cached and posted to Label Studio through its API (to tasks of the job's project only), so
  the annotators find them without asking again.
* TASKS_CREATED (an import) starts that same background work for the new tasks: precomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from rq.job import Job

from backend.runner import QueueRunner
from common import keys
from common.errors import JobTimeout
from common.jobs import ImageTask, PredictJob
from common.labelstudio.client import label_studio_client
from common.labelstudio.config import LabelSpec
from common.labelstudio.predictions import to_label_studio
from common.labelstudio.tasks import image_url
from common.projects import project_id
from common.settings import Settings

log = logging.getLogger(__name__)

CACHE_TTL = 7 * 24 * 3600


class PredictionCache:
    """Label Studio predictions by (version, label config, task, image URL)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection

    @staticmethod
    def key(version: str, label_config: str, task_id: Any, image_url: str | None) -> str:
        digest = hashlib.sha1(f"{label_config}\0{image_url}".encode()).hexdigest()[:16]
        return keys.cached_prediction(version, task_id, digest)

    def get_many(self, keys: list[str]) -> list[dict | list | None]:
        return [json.loads(v) if v is not None else None for v in self.connection.mget(keys)] if keys else []

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        pipe = self.connection.pipeline()
        for key, prediction in items.items():
            pipe.set(key, json.dumps(prediction), ex=CACHE_TTL)
        pipe.execute()


class Server:
    """Answers /predict from the cache and the queue, and finishes late jobs in the background."""

    def __init__(self, settings: Settings, runner: QueueRunner) -> None:
        self.settings = settings
        self.runner = runner
        self.cache = PredictionCache(runner.connection)
        self._background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prelabel-late-jobs")

    def predict(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str | None, version: str,
        images: list[str | None],
    ) -> tuple[list[Any], int]:  # fmt: skip
        """One prediction per task, in order ([] for a task not ready yet); and how many were cached.
        The missing tasks become jobs of at most MAX_TASKS_PER_JOB tasks, all queued at once."""
        keys = [self.cache.key(version, label_config, t["id"], url) for t, url in zip(tasks, images, strict=True)]
        with self.runner.redis_errors():
            answers: list[Any] = self.cache.get_many(keys)
        missing = [i for i, a in enumerate(answers) if a is None]
        cached = len(tasks) - len(missing)
        submitted = []
        for chunk in per_job(missing, self.settings.max_tasks_per_job):
            job = predict_job(spec, project, version, [tasks[i] for i in chunk], [images[i] for i in chunk])
            submitted.append((chunk, job, self.runner.submit_checked(job)))
        deadline = self.runner.deadline()
        for chunk, job, rq_job in submitted:
            try:
                result = self.runner.wait(rq_job, deadline=deadline)
            except JobTimeout as e:
                log.warning("%s; its %d tasks will be posted to Label Studio when done", e, len(chunk))
                self.finish_later(rq_job, job, spec, [keys[i] for i in chunk])
                continue
            fresh = to_label_studio(result, spec, version)
            with self.runner.redis_errors():
                self.cache.put_many({keys[i]: p for i, p in zip(chunk, fresh, strict=True) if p})
            for i, p in zip(chunk, fresh, strict=True):
                answers[i] = p
        return [a if a is not None else [] for a in answers], cached

    def precompute(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str, version: str
    ) -> list[str]:
        """Queue predictions for newly imported tasks (jobs of at most MAX_TASKS_PER_JOB); they
        are cached and posted when done. Returns the job ids."""
        images = [image_url(t, spec.image_key) for t in tasks]
        keys = [self.cache.key(version, label_config, t["id"], url) for t, url in zip(tasks, images, strict=True)]
        with self.runner.redis_errors():
            todo = [i for i, a in enumerate(self.cache.get_many(keys)) if a is None]
        ids = []
        for chunk in per_job(todo, self.settings.max_tasks_per_job):
            job = predict_job(spec, project, version, [tasks[i] for i in chunk], [images[i] for i in chunk])
            rq_job = self.runner.submit(job)
            self.finish_later(rq_job, job, spec, [keys[i] for i in chunk])
            ids.append(rq_job.id)
        return ids

    def finish_later(self, rq_job: Job, job: PredictJob, spec: LabelSpec, keys: list[str]) -> None:
        self._background.submit(self._finish, rq_job, job, spec, keys)

    def _finish(self, rq_job: Job, job: PredictJob, spec: LabelSpec, keys: list[str]) -> None:
        try:
            result = self.runner.wait(rq_job, deadline=self.runner.deadline(self.settings.job_timeout + 60))
        except Exception as e:  # failed or never picked up: nothing to post, the log says why
            log.warning("background predict job %s gave nothing to post: %s", rq_job.id, e)
            return
        predictions = to_label_studio(result, spec, job.model_version)
        self.cache.put_many({k: p for k, p in zip(keys, predictions, strict=True) if p})
        posted = self._post(job, predictions)
        log.info("background predict job %s done: %d predictions cached, %d posted to Label Studio",
                 rq_job.id, sum(1 for p in predictions if p), posted)  # fmt: skip

    def _post(self, job: PredictJob, predictions: list[Any]) -> int:
        """Post each prediction to its task, only when Label Studio says the task belongs to the
        job's project and still shows the image the prediction was made from (a forged
        TASKS_CREATED must not write into another project)."""
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key) or not job.project:
            return 0
        client = label_studio_client(self.settings, "Posting predictions")
        pid = project_id(job.project)
        posted = 0
        for task, prediction in zip(job.tasks, predictions, strict=True):
            if not prediction:
                continue
            try:
                stored = client.tasks.get(int(task.task_id))
                if stored.project != pid or (stored.data or {}).get(job.image_key) != task.image_url:
                    log.warning("task %s: prediction not posted: the task is not project %s's, or its image "
                                "changed", task.task_id, pid)  # fmt: skip
                    continue
                client.predictions.create(
                    task=int(task.task_id),
                    result=prediction["result"],
                    score=prediction["score"],
                    model_version=prediction["model_version"],
                )
                posted += 1
            except Exception as e:  # one refused prediction does not stop the others
                log.warning("could not post the prediction of task %s to Label Studio: %s", task.task_id,
                            type(e).__name__)  # fmt: skip
        return posted


def per_job(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """``indices`` in slices of at most ``size`` (MAX_TASKS_PER_JOB): one job each."""
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def predict_job(
    spec: LabelSpec, project: str | None, version: str, tasks: list[dict], images: list[str | None]
) -> PredictJob:
    """The job for ``tasks`` (Label Studio task dicts) whose image URLs are ``images``."""
    return PredictJob(
        model_version=version,
        image_key=spec.image_key,
        choices=spec.choices,
        brushes=spec.brushes,
        tasks=tuple(ImageTask(t["id"], url) for t, url in zip(tasks, images, strict=True)),
        project=project,
    )
