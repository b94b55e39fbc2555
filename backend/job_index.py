"""Each project's recent jobs: training runs, few-shot learner jobs and predict requests, newest
first, for ``GET /jobs?project=`` and the dashboard (RQ itself keeps no index by project)."""

from __future__ import annotations

import time
from typing import Any

import redis
from rq import Worker
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from common import keys
from common.jobs import ADAPT_QUEUE, TRAIN_QUEUE, AllowListedJob
from common.logs import redact_urls

#: Ids kept per project; learning jobs themselves are kept 30 days (``scheduler.KEEP_JOBS``).
KEPT = 100
KEEP_SECONDS = 30 * 24 * 3600
KINDS = {TRAIN_QUEUE: "training", ADAPT_QUEUE: "few-shot"}


def remember_job(connection: redis.Redis | redis.client.Pipeline, project: str, job_id: str) -> None:
    """Add ``job_id`` to the project's index (in the caller's pipeline, if it passes one)."""
    key = keys.project_jobs(project)
    connection.zadd(key, {job_id: time.time()})
    connection.zremrangebyrank(key, 0, -KEPT - 1)
    connection.expire(key, KEEP_SECONDS)


def job_statuses(connection: redis.Redis, job_ids: list[str]) -> list[str | None]:
    """The RQ status of each job (None where the job is gone), one field each, not the payloads."""
    pipe = connection.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(AllowListedJob.key_for(job_id), "status")
    return [status.decode() if status is not None else None for status in pipe.execute()]


def fail_abandoned(connection: redis.Redis, queues: tuple[str, ...] = (TRAIN_QUEUE, ADAPT_QUEUE)) -> None:
    """Fail the jobs of ``queues`` whose worker died (no heartbeat for 90 s), or hand them to their
    retry (predict jobs), now rather than when a worker of their queue next cleans up: there may be
    none until the trainer is back. RQ's own cleanup, with prelabel's job class (no callbacks run),
    of the expired jobs whose worker is gone from Redis too: a job's expiry is a time on its
    worker's clock, the worker's registration expires on Redis's, so a worker whose clock runs
    ahead keeps its job. RQ cleans up to a time, so the cut falls before the first expired job
    whose worker is alive; those after it wait for the next call."""
    prefix = Worker.redis_worker_namespace_prefix
    for name in queues:
        registry = StartedJobRegistry(name, connection=connection, serializer=JSONSerializer,
                                      job_class=AllowListedJob)  # fmt: skip
        now = time.time()
        expired = [(registry.parse_job_id(m.decode()), score)
                   for m, score in connection.zrangebyscore(registry.key, 0, now, withscores=True)]  # fmt: skip
        if not expired:
            continue
        jobs = AllowListedJob.fetch_many([job_id for job_id, _ in expired], connection=connection,
                                         serializer=JSONSerializer)  # fmt: skip
        alive = {
            worker: Worker.find_by_key(prefix + worker, connection=connection) is not None
            for worker in {job.worker_name for job in jobs if job is not None and job.worker_name}
        }
        kept = [score for (_, score), job in zip(expired, jobs, strict=True)
                if job is not None and alive.get(job.worker_name or "", False)]  # fmt: skip
        cut = min(kept) - 0.001 if kept else now
        if expired[0][1] <= cut:
            registry.cleanup(timestamp=cut)


def failure(result: Result | None) -> str | None:
    """A failed job's exception: the last line of its traceback, without URL queries or userinfo."""
    lines = (result.exc_string or "").strip().splitlines() if result is not None else []
    if lines and "AbandonedJobError" in lines[-1]:
        return "its worker stopped mid-job (killed, crashed or restarted): no heartbeat for 90 s"
    return redact_urls(lines[-1]) if lines else None


def project_jobs(connection: redis.Redis, project: str, progress: Any, limit: int = 20) -> list[dict[str, Any]]:
    """The project's newest jobs, each as its kind, status, times, progress and a one-line result.
    ``progress`` is the runner's, for predict requests."""
    fail_abandoned(connection)
    ids = [i.decode() for i in connection.zrevrange(keys.project_jobs(project), 0, limit - 1)]
    job_ids = [i for i in ids if not i.startswith("request-")]
    jobs = dict(zip(job_ids, AllowListedJob.fetch_many(job_ids, connection=connection, serializer=JSONSerializer),
                    strict=True))  # fmt: skip
    rows = []
    for job_id in ids:
        if job_id.startswith("request-"):
            request = progress(job_id)
            if request is not None:
                rows.append({"id": job_id, "kind": "predict request", "status": request["status"],
                             "enqueued_at": request["created_at"], "ended_at": None, "progress": None,
                             "summary": f"{request['tasks_done']} of {request['tasks']} tasks"})  # fmt: skip
            continue
        job = jobs[job_id]
        if job is None:
            continue
        status = job.get_status(refresh=False)
        result = job.latest_result()
        value = result.return_value if result is not None and result.type == result.Type.SUCCESSFUL else None
        meta = job.meta or {}
        rows.append({
            "id": job.id, "kind": KINDS.get(job.origin, job.origin), "status": status.value if status else None,
            "description": job.description,
            "enqueued_at": job.enqueued_at.timestamp() if job.enqueued_at else None,
            "ended_at": job.ended_at.timestamp() if job.ended_at else None,
            "progress": meta.get("progress"), "curve": meta.get("curve"),
            "summary": _summary(value) if value else (failure(result) or "")[:200],
        })  # fmt: skip
    return rows


def _summary(value: dict[str, Any]) -> str:
    """One line for a learning job's result: its decision and the version it made."""
    if not isinstance(value, dict):
        return ""
    parts = [str(value.get(k)) for k in ("status", "version") if value.get(k)]
    if value.get("reason"):
        parts.append(f"({value['reason']})")
    return " ".join(parts)[:200]
