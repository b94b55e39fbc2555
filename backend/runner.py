"""Where predict jobs run: on RQ workers through Redis, or in-process for a one-command demo.

Both runners implement ``Runner``: ``submit`` a ``PredictJob`` (never waits), ``wait`` for its
``PredictResult`` until a deadline (the job carries on past it), and ``status`` for /health and
for refusing work nobody can do. Both send the payload through JSON, so a job behaves the same on
either path. The prediction cache and late jobs (``backend/serving.py``) sit in front of both.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from rq import Queue, Retry, Worker
from rq.results import Result
from rq.serializers import JSONSerializer

from backend.job_index import fail_abandoned, job_statuses, remember_job
from backend.prometheus import record_job
from common import keys
from common.errors import JobFailed, JobTimeout, PrelabelError, ServiceUnavailable
from common.jobs import PREDICT_FUNCTION, PREDICT_QUEUE, AllowListedJob, PredictJob, PredictResult
from common.logs import redact_url
from common.settings import Settings

log = logging.getLogger(__name__)

#: How often a long wait looks for jobs abandoned by a dead worker.
ABANDONED_CHECK = 10
#: RQ job states as a request's progress counts its chunks (deferred and scheduled: still queued).
REQUEST_STATES = {"queued": "queued", "deferred": "queued", "scheduled": "queued", "started": "started",
                  "finished": "finished", "failed": "failed", "stopped": "canceled", "canceled": "canceled",
                  "expired": "expired"}  # fmt: skip
REQUEST_PENDING = ("queued", "deferred", "scheduled", "started")
#: Chunk ids a request's progress lists (an import of 100,000 tasks has 12,500).
MAX_LISTED_JOBS = 100
#: How long Redis keeps the note of which job computes a task's prediction (only a job still
#: queued or running counts, so a stale note costs nothing but its bytes).
IN_FLIGHT_TTL = 24 * 3600
#: RQ job states in which a job will still deliver its predictions.
IN_FLIGHT_STATES = ("queued", "deferred", "scheduled", "started")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def redis_unreachable(redis_url: str, error: Exception) -> ServiceUnavailable:
    """The 503 every route answers while Redis is away (the URL without its password)."""
    return ServiceUnavailable(f"Redis at {redact_url(redis_url)} is unreachable: {error}")


def redis_connection(settings: Settings) -> redis.Redis:
    """The backend's connection to ``REDIS_URL``. Reads may block for the whole predict budget
    (a job's result is awaited with a blocking read), so the socket timeout is longer."""
    assert settings.redis_url, "REDIS_URL is not set (embedded mode has no Redis)"
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=settings.predict_timeout + 10,
        health_check_interval=30,
    )


@dataclass(frozen=True)
class RunnerStatus:
    """What /health shows, and whether predict jobs can run."""

    details: dict[str, Any]
    #: Why predict jobs cannot run now (no worker listening, a model that failed to load), or None.
    unavailable: str | None = None
    #: Why they never will with this configuration (a model that failed to load): /setup refuses.
    misconfigured: str | None = None


class Runner(Protocol):
    mode: str
    #: Whether it takes work nobody waits for (imports to precompute, jobs past the deadline)
    #: without holding up interactive requests: the queue scales with workers, embedded does not.
    background: bool

    def submit(self, job: PredictJob, interactive: bool = False) -> str:
        """Start ``job`` and return its id at once; an ``interactive`` one (an annotator waiting
        for one task) goes ahead of bulk work already queued."""
        ...

    def track(self, job_ids: list[str], sizes: list[int], project: str | None) -> str | None:
        """Name the chunks (of ``sizes`` tasks) of one bulk request, for ``GET /jobs/<request id>``; None where
        requests are not tracked (embedded mode: the request waits for its jobs itself)."""
        ...

    def progress(self, request_id: str) -> dict[str, Any] | None:
        """A tracked request's state over all its chunks; None when unknown or expired."""
        ...

    def claim(self, cache_keys: list[str], job_id: str) -> None:
        """Note that job ``job_id`` computes the predictions of ``cache_keys``."""
        ...

    def owners(self, cache_keys: list[str]) -> dict[str, str]:
        """The jobs, still queued or running, that compute some of ``cache_keys``, by key."""
        ...

    def wait(self, job_id: str, deadline: float) -> PredictResult:
        """The job's result, by ``deadline`` (monotonic clock).

        Raises:
            JobTimeout: not done by then; the job keeps running and can be waited for again.
            JobFailed: the job raised, was canceled, or is no longer known (its result expired).
        """
        ...

    def status(self) -> RunnerStatus: ...


def make_runner(settings: Settings, connection: redis.Redis | None) -> Runner:
    """The queue runner on ``connection``, or the embedded one without Redis."""
    return QueueRunner(settings, connection) if connection is not None else InlineRunner(settings)


class QueueRunner:
    """Enqueue on RQ and wait for the result with a blocking read (no polling)."""

    mode = "queue"
    background = True

    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis_label = redact_url(settings.redis_url or "")
        self.connection = connection or redis_connection(settings)
        self.queue = Queue(PREDICT_QUEUE, connection=self.connection, serializer=JSONSerializer,
                           job_class=AllowListedJob)  # fmt: skip

    def submit(self, job: PredictJob, interactive: bool = False) -> str:
        """Enqueue ``job`` (it waits in the queue if no worker listens yet): at the back, or at
        the front when an annotator waits for it, so the next free worker takes it before the
        queued chunks of a bulk selection or an import."""
        with self.redis_errors():
            rq_job = self.queue.enqueue_call(
                PREDICT_FUNCTION,
                args=(job.to_dict(),),
                timeout=self.settings.job_timeout,
                result_ttl=self.settings.result_ttl,
                failure_ttl=self.settings.kept_ttl,
                description=f"predict {len(job.tasks)} tasks (project {job.project})",
                retry=Retry(max=1),  # a job whose worker died runs once more elsewhere
                at_front=interactive,
            )
        log.info("predict job %s enqueued%s: %d tasks, model %s", rq_job.id, " at the front" if interactive else "",
                 len(job.tasks), job.model_version)  # fmt: skip
        return rq_job.id

    def claim(self, cache_keys: list[str], job_id: str) -> None:
        with self.redis_errors():
            pipe = self.connection.pipeline(transaction=False)
            for key in cache_keys:
                pipe.set(keys.predicting(key), job_id, ex=IN_FLIGHT_TTL)
            pipe.execute()

    def owners(self, cache_keys: list[str]) -> dict[str, str]:
        if not cache_keys:
            return {}
        with self.redis_errors():
            named = self.connection.mget([keys.predicting(key) for key in cache_keys])
            job_ids = sorted({j.decode() for j in named if j is not None})
            statuses = job_statuses(self.connection, job_ids)
            live = {j for j, s in zip(job_ids, statuses, strict=True) if s in IN_FLIGHT_STATES}
        return {key: j.decode() for key, j in zip(cache_keys, named, strict=True) if j and j.decode() in live}

    def track(self, job_ids: list[str], sizes: list[int], project: str | None) -> str:
        """Record the chunks (and their task counts) of one request under a new id; the record
        lives as long as the chunks' results, and longer while chunks are still to run."""
        request_id = f"request-{uuid.uuid4().hex}"
        record = {"jobs": job_ids, "sizes": sizes, "project": project, "created_at": time.time()}
        with self.redis_errors():
            pipe = self.connection.pipeline()
            pipe.set(keys.predict_request(request_id), json.dumps(record), ex=self.settings.kept_ttl)
            if project:
                remember_job(pipe, project, request_id)
            pipe.execute()
        log.info("request %s: %d tasks in %d predict jobs, project %s", request_id, sum(sizes), len(job_ids), project)
        return request_id

    def progress(self, request_id: str) -> dict[str, Any] | None:
        with self.redis_errors():
            key = keys.predict_request(request_id)
            raw = self.connection.get(key)
            if raw is None:
                return None
            record = json.loads(raw)
            statuses = [s or "expired" for s in job_statuses(self.connection, record["jobs"])]
            if any(s in REQUEST_PENDING for s in statuses):
                self.connection.expire(key, self.settings.kept_ttl)  # still running: kept while it runs
        counts = dict.fromkeys(("queued", "started", "finished", "failed", "canceled", "expired"), 0)
        tasks_done = 0
        for status, size in zip(statuses, record["sizes"], strict=True):
            kind = REQUEST_STATES.get(status, "queued")
            counts[kind] += 1
            tasks_done += size if kind == "finished" else 0
        if counts["queued"] or counts["started"]:
            state = "started" if len(statuses) > counts["queued"] else "queued"
        elif counts["failed"] or counts["canceled"] or counts["expired"]:
            state = "failed" if counts["failed"] or counts["expired"] else "canceled"
        else:
            state = "finished"
        return {
            "id": request_id,
            "kind": "predict request",
            "status": state,
            "project": record["project"],
            "tasks": sum(record["sizes"]),
            "tasks_done": tasks_done,
            "chunks": {"total": len(statuses), **counts},
            "jobs": record["jobs"][:MAX_LISTED_JOBS],
            "created_at": record["created_at"],
        }

    def wait(self, job_id: str, deadline: float) -> PredictResult:
        """Block until the job has a result or ``deadline`` passes; the job itself keeps its place
        in the queue either way. Reads block for at most PREDICT_TIMEOUT at a time, within the
        connection's socket timeout."""
        started = time.monotonic()
        with self.redis_errors():
            rq_job = AllowListedJob(job_id, connection=self.connection, serializer=JSONSerializer)
            status = self.connection.hget(rq_job.key, "status")
            if status is None:
                raise JobFailed(f"No predict job {job_id}: it expired (results are kept RESULT_TTL seconds).")
            if status.decode() in ("canceled", "stopped"):
                raise JobFailed(f"Predict job {job_id} was {status.decode()}.")
            while True:
                remaining = min(deadline - time.monotonic(), self.settings.predict_timeout, ABANDONED_CHECK)
                result = rq_job.latest_result(timeout=max(1, math.floor(remaining)))
                if result is not None or time.monotonic() >= deadline:
                    break
                # A job whose worker died stays "started" until its execution expires (90 s after
                # the worker's last heartbeat); this hands it to its retry, or to the failed registry.
                fail_abandoned(self.connection, (self.queue.name,))
        if result is None:
            raise JobTimeout(
                f"Predict job {job_id} is not done after {time.monotonic() - started:.0f} s; it keeps running."
            )
        if result.type != Result.Type.SUCCESSFUL:
            reason = (result.exc_string or result.type.name).strip().splitlines()[-1]
            raise JobFailed(f"Predict job {job_id} failed in the worker: {reason}")
        answer = PredictResult.from_dict(result.return_value)
        waited = (time.monotonic() - started) * 1000
        worker_ms = answer.timings_ms.get("total", 0.0)
        record_job(answer.timings_ms)
        log.info("predict job %s answered in %.0f ms (worker %.0f ms, queue %.0f ms)", job_id, waited, worker_ms,
                 waited - worker_ms)  # fmt: skip
        return answer

    @contextlib.contextmanager
    def redis_errors(self) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as e:
            raise redis_unreachable(self.settings.redis_url or "", e) from e

    def status(self) -> RunnerStatus:
        with self.redis_errors():
            workers = Worker.all(queue=self.queue)  # live workers only: a dead one's key has expired
            details = {
                "mode": self.mode,
                "redis": "up",
                "queue": {"name": PREDICT_QUEUE, "pending": self.queue.count},
                "workers": {"count": len(workers), "busy": sum(1 for w in workers if w.get_state() == "busy")},
            }
        unavailable = None
        if not workers:
            unavailable = (
                f"No prelabel-worker is listening on queue '{PREDICT_QUEUE}' at {self.redis_label}. "
                "Start one with `prelabel-worker` and the same REDIS_URL."
            )
        return RunnerStatus(details, unavailable)


class InlineRunner:
    """Run jobs inside this process, one at a time on a background thread.

    This is the no-Redis mode for one user on a laptop. The worker's job function is imported by
    its dotted path, so only this mode pulls torch into the backend process.
    """

    mode = "embedded"
    background = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        module_name, _, function_name = PREDICT_FUNCTION.rpartition(".")
        self._tasks = importlib.import_module(module_name)
        self._predict = getattr(self._tasks, function_name)
        self._tasks.configure(settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prelabel-inline")
        self._executor.submit(self._tasks.warm_up)  # load the model now, not on the first request
        self._jobs: dict[str, Future] = {}
        self._finished: dict[str, float] = {}  # job id -> when it finished (monotonic)
        self._lock = threading.Lock()

    def submit(self, job: PredictJob, interactive: bool = False) -> str:
        """Jobs run in order: a request here waits for its own jobs one at a time (see
        ``Server.predict``), so no bulk work is ever queued ahead of an annotator."""
        payload = json.loads(json.dumps(job.to_dict()))  # the same round trip as through Redis
        job_id = uuid.uuid4().hex
        future = self._executor.submit(self._predict, payload)
        with self._lock:
            self._expire()
            self._jobs[job_id] = future
        future.add_done_callback(lambda _: self._done(job_id))
        return job_id

    def track(self, job_ids: list[str], sizes: list[int], project: str | None) -> None:
        return None

    def claim(self, cache_keys: list[str], job_id: str) -> None:
        return None  # one request at a time waits for its own jobs: nothing to share

    def owners(self, cache_keys: list[str]) -> dict[str, str]:
        return {}

    def progress(self, request_id: str) -> None:
        return None

    def _done(self, job_id: str) -> None:
        with self._lock:
            self._finished[job_id] = time.monotonic()

    def _expire(self) -> None:
        """Drop results nobody collected within RESULT_TTL, as Redis drops the queue's."""
        cutoff = time.monotonic() - self.settings.result_ttl
        for job_id in [j for j, at in self._finished.items() if at < cutoff]:
            self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)

    def wait(self, job_id: str, deadline: float) -> PredictResult:
        with self._lock:
            future = self._jobs.get(job_id)
        if future is None:
            raise JobFailed(f"No embedded job {job_id}: results are kept RESULT_TTL seconds after they finish.")
        try:
            value = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as e:
            raise JobTimeout(
                f"Prediction did not finish within {self.settings.predict_timeout:.0f} s (PREDICT_TIMEOUT); "
                "it keeps running. Select fewer tasks, or run workers with REDIS_URL."
            ) from e
        except PrelabelError:
            self._forget(job_id)
            raise
        except Exception as e:
            self._forget(job_id)
            log.exception("embedded predict failed")
            raise JobFailed(f"Prediction failed: {e}") from e
        self._forget(job_id)
        return PredictResult.from_dict(json.loads(json.dumps(value)))  # as a queued job's result is read

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._finished.pop(job_id, None)

    def status(self) -> RunnerStatus:
        model = self._tasks.model_status()
        error = model.get("error") if model.get("state") == "failed" else None
        return RunnerStatus({"mode": self.mode, "model": model}, unavailable=error, misconfigured=error)
