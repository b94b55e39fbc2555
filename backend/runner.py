"""Where predict jobs run: on RQ workers through Redis, or in-process for a one-command demo.

Both runners take a ``PredictJob`` and return a ``PredictResult`` within the backend's time budget;
both send the payload through JSON, so a job behaves the same on either path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import redis
from rq import Queue, Retry, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from common.errors import JobFailed, JobTimeout, PrelabelError, ServiceUnavailable
from common.jobs import PREDICT_FUNCTION, PREDICT_QUEUE, AllowListedJob, PredictJob, PredictResult
from common.logs import redact_url
from common.settings import Settings

log = logging.getLogger(__name__)

#: How often a long wait looks for jobs abandoned by a dead worker.
ABANDONED_CHECK = 10

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def redis_unreachable(redis_url: str, error: Exception) -> ServiceUnavailable:
    """The 503 every route answers while Redis is away (the URL without its password)."""
    return ServiceUnavailable(f"Redis at {redact_url(redis_url)} is unreachable: {error}")


class Runner(Protocol):
    mode: str

    def predict(self, job: PredictJob) -> PredictResult: ...

    def health(self) -> dict[str, Any]: ...

    def setup_error(self) -> str | None:
        """A reason to refuse /setup (the model cannot load), or None."""
        ...


def make_runner(settings: Settings) -> Runner:
    return InlineRunner(settings) if settings.embedded else QueueRunner(settings)


class QueueRunner:
    """Enqueue on RQ and wait for the result with a blocking read (no polling)."""

    mode = "queue"

    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        assert settings.redis_url, "QueueRunner needs REDIS_URL"
        self.settings = settings
        self.redis_label = redact_url(settings.redis_url)
        # Reads may block for the whole predict budget (XREAD BLOCK), so the socket timeout is longer.
        self.connection = connection or redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=settings.predict_timeout + 10,
            health_check_interval=30,
        )
        self.queue = Queue(PREDICT_QUEUE, connection=self.connection, serializer=JSONSerializer,
                           job_class=AllowListedJob)  # fmt: skip

    def predict(self, job: PredictJob) -> PredictResult:
        return self.wait(self.submit_checked(job), self.deadline())

    def deadline(self, seconds: float | None = None) -> float:
        """A monotonic deadline ``seconds`` (default PREDICT_TIMEOUT) from now."""
        return time.monotonic() + (self.settings.predict_timeout if seconds is None else seconds)

    def submit_checked(self, job: PredictJob) -> Job:
        """``submit``, refusing at once when no worker listens (rather than waiting for nobody)."""
        with self.redis_errors():
            if not Worker.all(queue=self.queue):  # live workers only: a dead one's key has expired
                raise ServiceUnavailable(
                    f"No prelabel-worker is listening on queue '{PREDICT_QUEUE}' at {self.redis_label}. "
                    "Start one with `prelabel-worker` and the same REDIS_URL."
                )
            return self.submit(job)

    def submit(self, job: PredictJob) -> Job:
        """Enqueue ``job``; the whole batch of tasks is one RQ job."""
        with self.redis_errors():
            rq_job = self.queue.enqueue_call(
                PREDICT_FUNCTION,
                args=(job.to_dict(),),
                timeout=self.settings.job_timeout,
                result_ttl=self.settings.result_ttl,
                failure_ttl=self.settings.result_ttl * 24,
                description=f"predict {len(job.tasks)} tasks (project {job.project})",
                retry=Retry(max=1),  # a job whose worker died runs once more elsewhere
            )
        log.info("predict job %s enqueued: %d tasks, model %s", rq_job.id, len(job.tasks), job.model_version)
        return rq_job

    def wait(self, rq_job: Job, deadline: float) -> PredictResult:
        """Block until ``rq_job`` has a result or ``deadline`` (monotonic) passes; the job itself
        keeps its place in the queue either way. Reads block for at most PREDICT_TIMEOUT at a time,
        within the connection's socket timeout."""
        started = time.monotonic()
        with self.redis_errors():
            while True:
                remaining = min(deadline - time.monotonic(), self.settings.predict_timeout, ABANDONED_CHECK)
                result = rq_job.latest_result(timeout=max(1, math.floor(remaining)))
                if result is not None or time.monotonic() >= deadline:
                    break
                # A job whose worker died stays "started" until its execution expires (JOB_TIMEOUT
                # + 60 s); this hands it to its retry, or to the failed registry, at that point.
                StartedJobRegistry(queue=self.queue, job_class=AllowListedJob).cleanup()
        if result is None:
            raise JobTimeout(
                f"Predict job {rq_job.id} is not done after {time.monotonic() - started:.0f} s; it keeps running."
            )
        if result.type != Result.Type.SUCCESSFUL:
            reason = (result.exc_string or result.type.name).strip().splitlines()[-1]
            raise JobFailed(f"Predict job {rq_job.id} failed in the worker: {reason}")
        answer = PredictResult.from_dict(result.return_value)
        waited = (time.monotonic() - started) * 1000
        worker_ms = answer.timings_ms.get("total", 0.0)
        log.info("predict job %s answered in %.0f ms (worker %.0f ms, queue %.0f ms)", rq_job.id, waited, worker_ms,
                 waited - worker_ms)  # fmt: skip
        return answer

    @contextlib.contextmanager
    def redis_errors(self) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as e:
            raise redis_unreachable(self.settings.redis_url, e) from e

    def health(self) -> dict[str, Any]:
        with self.redis_errors():
            self.connection.ping()
            workers = Worker.all(queue=self.queue)
            return {
                "mode": self.mode,
                "redis": "up",
                "queue": {"name": PREDICT_QUEUE, "pending": self.queue.count},
                "workers": {
                    "count": len(workers),
                    "busy": sum(1 for w in workers if w.get_state() == "busy"),
                },
            }

    def setup_error(self) -> str | None:
        return None


class InlineRunner:
    """Run jobs inside this process, one at a time on a background thread.

    This is the no-Redis mode for one user on a laptop. The worker's job function is imported by
    its dotted path, so only this mode pulls torch into the backend process.
    """

    mode = "embedded"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        module_name, _, self._function_name = PREDICT_FUNCTION.rpartition(".")
        self._tasks = importlib.import_module(module_name)
        self._tasks.configure(settings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prelabel-inline")
        self._executor.submit(self._tasks.warm_up)  # load the model now, not on the first request

    def predict(self, job: PredictJob) -> PredictResult:
        payload = json.loads(json.dumps(job.to_dict()))  # the same round trip as through Redis
        future = self._executor.submit(getattr(self._tasks, self._function_name), payload)
        try:
            return PredictResult.from_dict(future.result(timeout=self.settings.predict_timeout))
        except FutureTimeout as e:
            raise JobTimeout(
                f"Prediction did not finish within {self.settings.predict_timeout:.0f} s (PREDICT_TIMEOUT); "
                "it keeps running. Select fewer tasks, or run workers with REDIS_URL."
            ) from e
        except PrelabelError:
            raise
        except Exception as e:
            log.exception("embedded predict failed")
            raise JobFailed(f"Prediction failed: {e}") from e

    def health(self) -> dict[str, Any]:
        return {"mode": self.mode, "model": self._tasks.model_status()}

    def setup_error(self) -> str | None:
        status = self._tasks.model_status()
        return status.get("error") if status.get("state") == "failed" else None
