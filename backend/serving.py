"""Serving predictions fast: a cache in front of the runner, and work that outlives a request.
The same in both modes (``backend/runner.py``): only the cache's home differs.

* Every prediction served is cached (in Redis, or in memory without it) under (model version,
  label config, task id, image URL): asking again, or opening a task whose prediction was
  precomputed, costs a cache read.
* Only the tasks missing from the cache become jobs, of at most MAX_TASKS_PER_JOB tasks each.
  When a job does not finish within PREDICT_TIMEOUT (a large Retrieve Predictions selection),
  /predict answers with what is ready and the job carries on; when it finishes, its predictions
  are cached and posted to Label Studio through its API (to tasks of the job's project only), so
  the annotators find them without asking again.
* TASKS_CREATED (an import) starts that same background work for the new tasks: precomputing.
* A task asked for again while a job computes it (Retrieve Predictions clicked twice, a task
  opened while its import is precomputed) waits for that job instead of queuing the same work,
  and a late job does not post a prediction that a request has answered meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from label_studio_sdk.core.request_options import RequestOptions

from backend.runner import Runner
from common import keys
from common.errors import JobTimeout, PrelabelError, ServiceUnavailable
from common.jobs import ImageTask, PredictJob
from common.labelstudio.annotations import image_url
from common.labelstudio.client import label_studio_client
from common.labelstudio.config import LabelSpec
from common.labelstudio.predictions import to_label_studio
from common.projects import project_id
from common.settings import Settings, project_version

log = logging.getLogger(__name__)

CACHE_TTL = 7 * 24 * 3600
#: Label Studio's task API rewrites storage URIs into its own resolver URLs unless told not to.
AS_STORED: RequestOptions = {"additional_query_parameters": {"resolve_uri": False}}
#: The embedded mode keeps at most this much of served predictions in memory.
MEMORY_CACHE_BYTES = 256 * 1024 * 1024


def cache_key(version: str, label_config: str, task_id: Any, url: str | None) -> str:
    """One task's prediction under a model version, a label config and an image URL."""
    digest = hashlib.sha1(f"{label_config}\0{url}".encode()).hexdigest()[:16]
    return keys.cached_prediction(version, task_id, digest)


#: Called with (project, {task id: prediction}) for predictions served or posted.
Remember = Callable[[str, dict[Any, dict]], None]


class PredictionCache(Protocol):
    """Label Studio predictions by ``cache_key``."""

    def get_many(self, cache_keys: list[str]) -> list[dict | list | None]: ...

    def put_many(self, items: dict[str, Any]) -> None: ...


class RedisCache:
    """The queue mode's cache: shared by every backend process, kept for CACHE_TTL."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection

    def get_many(self, cache_keys: list[str]) -> list[dict | list | None]:
        found = self.connection.mget(cache_keys) if cache_keys else []
        return [json.loads(v) if v is not None else None for v in found]

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        pipe = self.connection.pipeline()
        for key, prediction in items.items():
            pipe.set(key, json.dumps(prediction), ex=CACHE_TTL)
        pipe.execute()


class MemoryCache:
    """The embedded mode's cache: this process's memory, least recently used dropped first."""

    def __init__(self, max_bytes: int = MEMORY_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_many(self, cache_keys: list[str]) -> list[dict | list | None]:
        with self._lock:
            found = [self._items.get(key) for key in cache_keys]
            for key, value in zip(cache_keys, found, strict=True):
                if value is not None:
                    self._items.move_to_end(key)
        return [json.loads(v) if v is not None else None for v in found]

    def put_many(self, items: dict[str, Any]) -> None:
        texts = {key: json.dumps(prediction) for key, prediction in items.items()}
        with self._lock:
            for key, text in texts.items():
                old = self._items.pop(key, None)
                self._bytes += len(key) + len(text) - (len(key) + len(old) if old is not None else 0)
                self._items[key] = text
            while self._bytes > self.max_bytes and self._items:
                key, text = self._items.popitem(last=False)
                self._bytes -= len(key) + len(text)


@dataclass(frozen=True)
class Served:
    """What /predict answers: one prediction per task ([] where not ready), how many came from
    the cache, and the id under which the rest is tracked (None for one task or none missing)."""

    predictions: list[Any]
    cached: int
    request: str | None


class Server:
    """Answers /predict from the cache and the runner, and finishes late jobs in the background."""

    def __init__(
        self, settings: Settings, runner: Runner, cache: PredictionCache, posted: Remember | None = None
    ) -> None:
        """``posted`` hears of the predictions posted to Label Studio in the background (the
        correction report compares them with what annotators make of them)."""
        self.settings = settings
        self.runner = runner
        self.cache = cache
        self.posted = posted
        self._background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prelabel-late-jobs")

    def predict(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str | None, version: str,
        images: list[str | None], project_settings: dict[str, Any] | None = None,
    ) -> Served:  # fmt: skip
        """One prediction per task, in order ([] for a task not ready yet), from ``version`` with
        the project's own settings (extra_params).

        The missing tasks become jobs of at most MAX_TASKS_PER_JOB tasks. A runner that takes
        background work (the queue) gets them all at once, a single task (an annotator opening
        it) ahead of queued bulk work; a job not done by PREDICT_TIMEOUT is finished later,
        cached and posted to Label Studio. The embedded runner, which runs one job at a time,
        gets them one after the other until PREDICT_TIMEOUT, so that an annotator's next request
        does not wait behind a whole selection; Label Studio asks again for the rest. Tasks that
        jobs queued earlier compute already are waited for, not queued again (``_lookup``).
        """
        interactive = len(tasks) == 1
        cache_keys, answers, jobs, elsewhere = self._lookup(tasks, spec, label_config, project, version, images,
                                                            project_settings or {}, interactive)  # fmt: skip
        cached = len(tasks) - sum(len(chunk) for chunk, _ in jobs) - sum(1 for key in cache_keys if key in elsewhere)
        if jobs or elsewhere:  # a worker must be there to run ours, or theirs
            status = self.runner.status()
            if status.unavailable:
                raise ServiceUnavailable(status.unavailable)
        deadline = time.monotonic() + self.settings.predict_timeout
        ids = self._submit(jobs, cache_keys, interactive) if self.runner.background else []
        sizes = [len(chunk) for chunk, _ in jobs]
        request = self.runner.track(ids, sizes, project) if ids and not interactive else None
        for n, (chunk, job) in enumerate(jobs):
            if not ids and time.monotonic() >= deadline:
                break
            job_id = ids[n] if ids else self.runner.submit(job)
            try:
                result = self.runner.wait(job_id, deadline=deadline)
            except JobTimeout as e:
                log.warning("%s; its %d tasks will be posted to Label Studio when done", e, len(chunk))
                self.finish_later(job_id, job, spec, [cache_keys[i] for i in chunk])
                continue
            except PrelabelError:  # this request fails; the jobs already queued still finish
                for (later, later_job), later_id in zip(jobs[n + 1 :], ids[n + 1 :], strict=False):
                    self.finish_later(later_id, later_job, spec, [cache_keys[i] for i in later])
                raise
            fresh = to_label_studio(result, spec, result.model_version)
            self.cache.put_many({cache_keys[i]: p for i, p in zip(chunk, fresh, strict=True) if p})
            for i, p in zip(chunk, fresh, strict=True):
                answers[i] = p
        self._collect(elsewhere, tasks, cache_keys, answers, spec, deadline)
        return Served([a if a is not None else [] for a in answers], cached, request)

    def _submit(
        self, jobs: list[tuple[Sequence[int], PredictJob]], cache_keys: list[str], interactive: bool
    ) -> list[str]:
        """Queue ``jobs`` and note which job computes which prediction, for whoever asks again meanwhile."""
        ids = []
        for chunk, job in jobs:
            ids.append(self.runner.submit(job, interactive))
            self.runner.claim([cache_keys[i] for i in chunk], ids[-1])
        return ids

    def _collect(
        self, elsewhere: dict[str, str], tasks: list[dict], cache_keys: list[str], answers: list[Any],
        spec: LabelSpec, deadline: float,
    ) -> None:  # fmt: skip
        """Fill ``answers`` from the jobs that earlier requests queued for some of these tasks, as
        far as they finish by ``deadline``. Those jobs are their requests' to finish: what is not
        done by then is posted to Label Studio when it is, as for the request that queued it."""
        waiting: dict[str, list[int]] = {}
        for i, key in enumerate(cache_keys):
            if key in elsewhere:
                waiting.setdefault(elsewhere[key], []).append(i)
        for job_id, indices in waiting.items():
            if time.monotonic() >= deadline:
                break
            try:
                result = self.runner.wait(job_id, deadline)
            except PrelabelError as e:  # not done yet, or failed: the request that queued it says so
                log.warning("predict job %s, which %d tasks of this request wait for: %s", job_id, len(indices), e)
                continue
            predictions = to_label_studio(result, spec, result.model_version)
            ids = [str(t.task_id) for t in result.tasks]
            # by task id: that job was another request's; an id it holds twice (two images) is left out
            by_task = {i: p for i, p in zip(ids, predictions, strict=True) if ids.count(i) == 1}
            for i in indices:
                answers[i] = by_task.get(str(tasks[i]["id"])) or None
            self.cache.put_many({cache_keys[i]: answers[i] for i in indices if answers[i]})

    def precompute(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str, version: str,
        project_settings: dict[str, Any],
    ) -> str | None:  # fmt: skip
        """Queue predictions for newly imported tasks (jobs of at most MAX_TASKS_PER_JOB); they
        are cached and posted when done. Returns the request's id (its progress is at
        ``/jobs/<id>``), or None when every task is cached or the runner takes no background work
        (embedded mode: imports are predicted when their tasks are opened)."""
        if not self.runner.background:
            return None
        images = [image_url(t, spec.image_key) for t in tasks]
        cache_keys, _, jobs, _ = self._lookup(tasks, spec, label_config, project, version, images, project_settings)
        ids = []
        for chunk, job in jobs:  # each job has its finisher before the next is queued (Redis may go)
            ids += self._submit([(chunk, job)], cache_keys, interactive=False)
            self.finish_later(ids[-1], job, spec, [cache_keys[i] for i in chunk])
        return self.runner.track(ids, [len(chunk) for chunk, _ in jobs], project) if ids else None

    def _lookup(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str | None, version: str,
        images: list[str | None], project_settings: dict[str, Any], interactive: bool = False,
    ) -> tuple[list[str], list[Any], list[tuple[Sequence[int], PredictJob]], dict[str, str]]:  # fmt: skip
        """The tasks' cache keys and cached answers (None where missing), the jobs, of at most
        MAX_TASKS_PER_JOB tasks, for the missing ones with the indices of their tasks, and the
        missing ones that jobs queued earlier compute already (asked again while those run:
        Retrieve Predictions clicked twice, an import being precomputed). Those are not computed
        twice, except that an annotator opening one task never waits on another request's job
        (queued behind bulk work, or on a worker that may have died): their task gets its own
        job, at the front, and the other job does not post it again."""
        served = project_version(version, project_settings)
        cache_keys = [cache_key(served, label_config, t["id"], url) for t, url in zip(tasks, images, strict=True)]
        answers: list[Any] = self.cache.get_many(cache_keys)
        missing = [i for i, a in enumerate(answers) if a is None]
        elsewhere = self.runner.owners([cache_keys[i] for i in missing]) if not interactive else {}
        missing = [i for i in missing if cache_keys[i] not in elsewhere]
        jobs = [
            (
                chunk,
                predict_job(
                    spec, project, version, [tasks[i] for i in chunk], [images[i] for i in chunk], project_settings
                ),
            )  # fmt: skip
            for chunk in per_job(missing, self.settings.max_tasks_per_job)
        ]
        return cache_keys, answers, jobs, elsewhere

    def finish_later(self, job_id: str, job: PredictJob, spec: LabelSpec, cache_keys: list[str]) -> None:
        self._background.submit(self._finish, job_id, job, spec, cache_keys)

    def _finish(self, job_id: str, job: PredictJob, spec: LabelSpec, cache_keys: list[str]) -> None:
        try:
            result = self.runner.wait(job_id, deadline=time.monotonic() + self.settings.job_timeout + 60)
        except Exception as e:  # failed or never picked up: nothing to post, the log says why
            log.warning("background predict job %s gave nothing to post: %s", job_id, e)
            return
        predictions = to_label_studio(result, spec, result.model_version)
        # One cached meanwhile was in a request's answer (an annotator opened the task, or a request
        # asking again collected this job's result): posting it too would add a copy.
        answered = [p is not None for p in self.cache.get_many(cache_keys)]
        fresh = {k: p for k, p, a in zip(cache_keys, predictions, answered, strict=True) if p and not a}
        self.cache.put_many(fresh)
        posted = self._post(job, [p if not a else [] for p, a in zip(predictions, answered, strict=True)])
        if posted and self.posted is not None and job.project:
            try:
                self.posted(job.project, posted)
            except redis.exceptions.RedisError as e:  # the report misses them; the predictions are posted
                log.warning("background predict job %s: posted predictions not remembered: %s", job_id, e)
        log.info("background predict job %s done: %d predictions cached, %d posted to Label Studio (%d answered "
                 "meanwhile)", job_id, len(fresh), len(posted), sum(answered))  # fmt: skip

    def _post(self, job: PredictJob, predictions: list[Any]) -> dict[Any, dict]:
        """Post each prediction to its task, only when Label Studio says the task belongs to the
        job's project and still shows the image the prediction was made from (a forged
        TASKS_CREATED must not write into another project). Returns the posted ones by task id."""
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key) or not job.project:
            return {}
        pid = project_id(job.project)
        posted = {}
        with label_studio_client(self.settings, "Posting predictions") as client:
            for task, prediction in zip(job.tasks, predictions, strict=True):
                if not prediction:
                    continue
                try:
                    # as stored, cloud storage URIs (s3://...) included, not as Label Studio's editor sees it
                    stored = client.tasks.get(str(int(task.task_id)), request_options=AS_STORED)
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
                    posted[task.task_id] = prediction
                except Exception as e:  # one refused prediction does not stop the others
                    log.warning("could not post the prediction of task %s to Label Studio: %s", task.task_id,
                                type(e).__name__)  # fmt: skip
        return posted


def per_job(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """``indices`` in slices of at most ``size`` (MAX_TASKS_PER_JOB): one job each."""
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def predict_job(
    spec: LabelSpec, project: str | None, version: str, tasks: list[dict], images: list[str | None],
    project_settings: dict[str, Any] | None = None,
) -> PredictJob:  # fmt: skip
    """The job for ``tasks`` (Label Studio task dicts) whose image URLs are ``images``."""
    return PredictJob(
        model_version=version,
        image_key=spec.image_key,
        choices=spec.choices,
        brushes=spec.brushes,
        regions=spec.regions,
        tasks=tuple(ImageTask(t["id"], url) for t, url in zip(tasks, images, strict=True)),
        project=project,
        project_settings=dict(project_settings or {}),
    )
