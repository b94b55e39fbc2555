"""``prelabel-worker [QUEUE ...]``: an RQ worker that loads the model once and runs every job in
its own process.

RQ's default ``Worker`` forks a child per job: the child would reload the model (seconds to
minutes) or inherit a CUDA context that cannot be used after a fork. ``SimpleWorker`` runs jobs
in the worker process, so the model loaded here stays warm. Run one worker per GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Iterator

import redis
from rq import Queue, SimpleWorker, Worker, worker_registration
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from common import keys
from common.errors import ModelUnavailable, SettingsError
from common.jobs import ADAPT_QUEUE, PREDICT_QUEUE, TRAIN_QUEUE, AllowListedJob
from common.logs import configure_logging, redact_url
from common.settings import Settings
from worker import tasks
from worker.progress import SHUTTING_DOWN

log = logging.getLogger(__name__)

#: Seconds a worker's registration outlives its last heartbeat (heartbeats every WORKER_TTL - 15 s).
WORKER_TTL = 60
#: Seconds between the worker's registry clean-ups (abandoned jobs of dead workers are retried).
MAINTENANCE_INTERVAL = 60


@contextlib.contextmanager
def _logged_if_redis_away(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        log.warning("%s: Redis: %s", what, e)


class PrelabelWorker(SimpleWorker):
    """RQ's SimpleWorker (no fork: the model stays loaded) that registers itself again on every
    heartbeat, so it is found again after Redis restarts without its data, keeps heartbeating while
    a job runs, so a dead worker's job is noticed within 90 s, and runs only ``AllowListedJob``s."""

    job_class = AllowListedJob

    # RQ's work loop waits for Redis to come back only around its blocking dequeue. The writes it
    # makes between a job's end and that wait (the idle state, a heartbeat, the suspension check,
    # registry clean-ups) raise instead, and RQ ends the worker on them: a Redis restart just as a
    # job ended killed the process. Each is informational or repeated on the next round, so here
    # a Redis error there is logged and the loop goes on to the dequeue, which waits for Redis.

    def set_state(self, state: str, pipeline=None) -> None:
        with _logged_if_redis_away(f"worker state {state} not recorded"):
            super().set_state(state, pipeline)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ's, and registers the worker again, with all it said at birth (its host, for
        ``--check``), so it is found after Redis restarts empty."""
        with _logged_if_redis_away("heartbeat not sent"):
            super().heartbeat(timeout, pipeline)
            if pipeline is None and self.birth_date and not self.connection.hexists(self.key, "birth"):
                self.connection.hset(self.key, mapping=self.serialize())
            worker_registration.register(self, pipeline=pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        with _logged_if_redis_away("suspension not checked"):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with _logged_if_redis_away("registries not cleaned"):
            super().run_maintenance_tasks()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """SimpleWorker's, plus heartbeats while the job runs. RQ's SimpleWorker sends none during a
        job; it registers itself and the job for the job's whole timeout instead, so a worker killed
        mid-job looked alive, and its job running, for up to JOB_TIMEOUT (a training run: 4 h, in
        which its project could not train again). With heartbeats both expire 90 s after the kill."""
        with _logged_if_redis_away(f"job {job.id} not run or its outcome not recorded"):
            execution = self.prepare_execution(job)
            done = threading.Event()
            beating = threading.Thread(target=self._beat_until, args=(done, job, execution), name="job heartbeat",
                                       daemon=True)  # fmt: skip
            beating.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                done.set()
                beating.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat_until(self, done: threading.Event, job: Job, execution: Execution) -> None:
        while not done.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
                if job.get_status(refresh=True) == JobStatus.FAILED and not done.is_set():
                    # Failed as abandoned while it runs (Redis away for over a minute): a training
                    # run must not promote a model after its project was told it failed.
                    log.warning("job %s was failed as abandoned while it runs; asking it to stop", job.id)
                    self.connection.set(keys.cancel(job.id), 1, ex=keys.CANCEL_TTL)
            except Exception as e:  # Redis away, or anything else: the next beat tries again
                log.warning("job %s: heartbeat failed: %s", job.id, e)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long the worker's and the job's registrations outlive a heartbeat: the next one is
        due within ``job_monitoring_interval`` (RQ's rule for its forking worker)."""
        left = job.timeout - working_time if job.timeout and job.timeout > 0 else self.job_monitoring_interval
        return int(min(max(left, 0), self.job_monitoring_interval)) + 60

    def handle_warm_shutdown_request(self) -> None:
        """SIGTERM: a prediction finishes; a training or few-shot job stops at its next step."""
        super().handle_warm_shutdown_request()
        SHUTTING_DOWN.set()

    def unsubscribe(self) -> None:
        """Trip the command listener's stop flag before RQ unsubscribes it. RQ unsubscribes first
        and stops the thread after; a listener that takes the unsubscribe reply in between waits
        again, up to 60 s, and redis-py's ``stop()`` waits for it: a warm shutdown hung a minute."""
        if self.pubsub_thread is not None:
            self.pubsub_thread.stop(timeout=0)
        super().unsubscribe()


def check(settings: Settings, queues: list[str]) -> str | None:
    """Why no live worker of this host serves each of ``queues``, or None. A worker that stops
    heartbeating drops out of RQ's registry after WORKER_TTL, so a hung one fails this too."""
    connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    host = socket.gethostname()
    try:
        for name in queues:
            queue = Queue(name, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
            if not any(worker.hostname == host for worker in Worker.all(queue=queue)):
                return f"no live prelabel-worker on {host} serves queue '{name}'"
    except redis.exceptions.RedisError as e:
        return f"Redis at {redact_url(settings.redis_url or '')} is unreachable: {e}"
    finally:
        connection.close()
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prelabel-worker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "queues", nargs="*", default=[PREDICT_QUEUE, ADAPT_QUEUE],
        help=f"queues to serve, first first: {PREDICT_QUEUE} {ADAPT_QUEUE} (default: predictions, then the few-shot "
        f"learner's jobs) or {TRAIN_QUEUE} (training runs)",
    )  # fmt: skip
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--name", help="worker name shown in RQ (default: host and pid)")
    parser.add_argument("--check", action="store_true",
                        help="healthcheck: exit 0 if a live worker of this host serves the queues, else 1")  # fmt: skip
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as e:
        sys.exit(f"prelabel-worker: {e}")
    if not settings.redis_url:
        sys.exit("prelabel-worker: set REDIS_URL (e.g. redis://localhost:6379/0) to the backend's Redis.")
    if args.check:
        problem = check(settings, args.queues)
        if problem:
            sys.exit(f"prelabel-worker: {problem}")
        return
    configure_logging(settings.log_level)
    if PREDICT_QUEUE in args.queues and TRAIN_QUEUE in args.queues:
        log.warning("serving both '%s' and '%s': training will share this worker's device with predictions; "
                    "run a separate `prelabel-worker %s` with its own DEVICE instead", PREDICT_QUEUE, TRAIN_QUEUE,
                    TRAIN_QUEUE)  # fmt: skip

    provider = tasks.configure(settings)
    try:
        provider.get()  # load before taking any job: a missing model stops the worker here
    except ModelUnavailable as e:
        sys.exit(f"prelabel-worker: {e}")

    connection = redis.Redis.from_url(settings.redis_url)
    try:
        connection.ping()
    except redis.exceptions.ConnectionError as e:
        sys.exit(f"prelabel-worker: Redis at {redact_url(settings.redis_url)} is unreachable: {e}")
    worker = PrelabelWorker(args.queues, connection=connection, serializer=JSONSerializer, name=args.name,
                            worker_ttl=WORKER_TTL, maintenance_interval=MAINTENANCE_INTERVAL)  # fmt: skip
    log.info("worker %s serving %s with model %s", worker.name, ", ".join(args.queues), settings.model_version)
    worker.work(burst=args.burst, logging_level=settings.log_level)


if __name__ == "__main__":
    main()
