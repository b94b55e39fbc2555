"""When learning runs. Training: Start Training, every N corrections, or on a schedule, and never
twice at once for a project (one run queued or running at most). The few-shot learner: every
ADAPT_EVERY corrections, one job waiting per project at most. The backend only enqueues."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend.job_index import fail_abandoned, remember_job
from backend.project_settings import ProjectSettings
from common import keys
from common.errors import NotFound
from common.jobs import ADAPT_FUNCTION, ADAPT_QUEUE, TRAIN_FUNCTION, TRAIN_QUEUE, AllowListedJob, TrainJob
from common.labelstudio.config import LabelSpec, parse_label_config
from common.projects import project_id
from common.settings import Settings
from common.versions import Registry

log = logging.getLogger(__name__)

PENDING = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
#: A few-shot job that has started reads the corrections as they were: later ones need another.
WAITING = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
#: Finished learning jobs (and their summaries) are kept this long.
KEEP_JOBS = 30 * 24 * 3600
#: Remembering a project under concurrent writers tries this many times (one transaction each).
REMEMBER_TRIES = 50


class TrainingScheduler:
    """Enqueues training runs on the ``train`` queue and few-shot learner jobs on ``adapt``,
    deduplicated per project."""

    def __init__(
        self, settings: Settings, connection: redis.Redis, registry: Registry, project_settings: ProjectSettings
    ) -> None:
        self.settings = settings
        self.project_settings = project_settings
        self.connection = connection
        self.registry = registry
        self.queue = Queue(TRAIN_QUEUE, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
        self.adapt_queue = Queue(ADAPT_QUEUE, connection=connection, serializer=JSONSerializer,
                                 job_class=AllowListedJob)  # fmt: skip

    def remember_project(self, project: str, label_config: str) -> None:
        """Keep the project's label config, for scheduled runs that have no request to read it from
        (one uid per Label Studio project id: the latest one named). One watched transaction, so two
        backends naming the same id with different uids at once (a reset Label Studio's and the old
        one's) leave one uid remembered, not both."""
        pid = project_id(project)
        with self.connection.pipeline() as pipe:
            for _ in range(REMEMBER_TRIES):
                try:
                    pipe.watch(keys.PROJECT_UIDS, keys.PROJECTS)
                    previous = pipe.hget(keys.PROJECT_UIDS, str(pid))
                    if previous == project.encode() and pipe.hget(keys.PROJECTS, project) == label_config.encode():
                        pipe.unwatch()
                        return  # the usual /setup: nothing changed, nothing written
                    if previous is not None:
                        stale = [previous.decode()]
                    else:  # the first time since PROJECT_UIDS exists: older backends kept every uid of the id
                        stale = [uid.decode() for uid in pipe.hkeys(keys.PROJECTS) if project_id(uid.decode()) == pid]
                    pipe.multi()
                    for uid in stale:
                        if uid != project:
                            pipe.hdel(keys.PROJECTS, uid)
                    pipe.hset(keys.PROJECT_UIDS, str(pid), project)
                    pipe.hset(keys.PROJECTS, project, label_config)
                    pipe.execute()
                    return
                except redis.WatchError:  # another backend remembered a project meanwhile: read again
                    continue
        raise redis.exceptions.RedisError(f"project {project}: the remembered projects kept changing; not stored")

    def known_projects(self) -> list[str]:
        """The projects whose label config is remembered (those /setup or a webhook named)."""
        return [uid.decode() for uid in self.connection.hkeys(keys.PROJECTS)]

    def current(self, project: str) -> Job | None:
        """The project's training run that is queued or running, if any. A run whose worker died
        (no heartbeat for 90 s) is failed first, so the project can train again without waiting
        for a training worker to come back and clean up."""
        fail_abandoned(self.connection)
        return self._latest(keys.training_job(project), PENDING)

    def _latest(self, key: str, states: tuple[JobStatus, ...]) -> Job | None:
        """The job whose id ``key`` holds, if it is in one of ``states``."""
        job_id = self.connection.get(key)
        if job_id is None:
            return None
        try:
            job = AllowListedJob.fetch(job_id.decode(), connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:  # expired or deleted: nothing pending
            return None
        return job if job.get_status(refresh=False) in states else None

    def _payload(self, project: str, spec: LabelSpec, trigger: str) -> dict[str, Any]:
        return TrainJob(
            project=project,
            model_version=self.registry.active(project),
            image_key=spec.image_key,
            choices=spec.choices,
            brushes=spec.brushes,
            regions=spec.regions,
            trigger=trigger,
            project_settings=self.project_settings.get(project),  # learners fit what the project is served
        ).to_dict()

    def enqueue(self, project: str, spec: LabelSpec, trigger: str) -> tuple[Job, bool]:
        """Queue a run unless one is pending; returns (the pending or new job, whether it is new)."""
        with self.connection.lock(keys.training_lock(project), timeout=10, blocking_timeout=5):
            pending = self.current(project)
            if pending is not None:
                log.info("project %s: training already %s as job %s (%s ignored)", project,
                         pending.get_status(), pending.id, trigger)  # fmt: skip
                return pending, False
            job = self.queue.enqueue_call(
                TRAIN_FUNCTION,
                args=(self._payload(project, spec, trigger),),
                timeout=self.settings.train_timeout,
                result_ttl=KEEP_JOBS,
                failure_ttl=KEEP_JOBS,
                description=f"train project {project} ({trigger})",
            )
            self.connection.set(keys.training_job(project), job.id)
            self.connection.set(keys.new_corrections(project), 0)
            remember_job(self.connection, project, job.id)
        log.info("project %s: training job %s queued (%s)", project, job.id, trigger)
        return job, True

    def corrections_arrived(self, project: str, count: int, spec: LabelSpec) -> Job | None:
        """Count new corrections; every TRAIN_EVERY of them starts a run."""
        total = self.connection.incrby(keys.new_corrections(project), count)
        if self.settings.train_every and total >= self.settings.train_every:
            return self.enqueue(project, spec, "corrections")[0]
        return None

    def adapt_after(self, project: str, count: int, spec: LabelSpec) -> Job | None:
        """Count new corrections; every ADAPT_EVERY of them queues a few-shot learner job, unless
        one is still waiting (it will read these corrections too). Returns the new job."""
        total = self.connection.incrby(keys.adapt_corrections(project), count)
        if not self.settings.adapt_every or total < self.settings.adapt_every:
            return None
        with self.connection.lock(keys.training_lock(project), timeout=10, blocking_timeout=5):
            if self._latest(keys.adapt_job(project), WAITING) is not None:
                self.connection.set(keys.adapt_corrections(project), 0)  # the waiting job will read them
                return None
            job = self.adapt_queue.enqueue_call(
                ADAPT_FUNCTION,
                args=(self._payload(project, spec, "corrections"),),
                timeout=self.settings.job_timeout,
                result_ttl=KEEP_JOBS,
                failure_ttl=KEEP_JOBS,
                description=f"few-shot learner for project {project}",
            )
            self.connection.set(keys.adapt_job(project), job.id)
            self.connection.set(keys.adapt_corrections(project), 0)
            remember_job(self.connection, project, job.id)
        log.info("project %s: few-shot learner job %s queued", project, job.id)
        return job

    def sweep(self) -> list[str]:
        """The scheduled trigger: a run for every known project with corrections since its last run."""
        started = []
        for raw_project, config in self.connection.hgetall(keys.PROJECTS).items():
            project = raw_project.decode()
            if int(self.connection.get(keys.new_corrections(project)) or 0) > 0:
                job, created = self.enqueue(
                    project, parse_label_config(config.decode(), self.settings.max_labels), "schedule"
                )
                if created:
                    started.append(job.id)
        return started

    def start_schedule(self) -> threading.Thread | None:
        """Every TRAIN_INTERVAL seconds, one sweep across all backend processes (a Redis lock)."""
        interval = self.settings.train_interval
        if not interval:
            return None

        def loop() -> None:
            while True:
                time.sleep(interval)
                try:
                    if self.connection.set(keys.SWEEP_LOCK, "1", nx=True, ex=max(1, interval - 1)):
                        self.sweep()
                except Exception:  # Redis down for a while: try again next interval
                    log.exception("scheduled training sweep failed")

        thread = threading.Thread(target=loop, name="prelabel-train-schedule", daemon=True)
        thread.start()
        return thread

    def job(self, job_id: str) -> Job:
        fail_abandoned(self.connection)
        try:
            return AllowListedJob.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError as e:
            raise NotFound(f"No job {job_id!r} (finished jobs are kept for 30 days).") from e

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued run, or ask a running one to stop at its next step."""
        job = self.job(job_id)
        status = job.get_status()
        if status == JobStatus.QUEUED:
            job.cancel()
            return {"id": job_id, "status": "canceled"}
        if status == JobStatus.STARTED:
            self.connection.set(keys.cancel(job_id), 1, ex=keys.CANCEL_TTL)
            return {"id": job_id, "status": "stopping"}
        return {"id": job_id, "status": str(status.value if status else "unknown"), "detail": "not running"}
