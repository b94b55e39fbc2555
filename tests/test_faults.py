"""Faults: Redis going away and coming back, and a worker killed in the middle of a job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from backend.app import create_app
from backend.runner import QueueRunner
from common.jobs import (
    PREDICT_FUNCTION,
    PREDICT_QUEUE,
    AllowListedJob,
    ChoicesControl,
    ClassLabel,
    ImageTask,
    PredictJob,
)
from tests.labelstudio import free_port
from tests.test_queue import start_worker, stop, wait_for_workers
from tests.test_training import CONFIG
from worker.cli import PrelabelWorker, check

pytestmark = pytest.mark.slow


class OwnRedis:
    """A redis-server of the test's own, without persistence, that can be stopped and restarted."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.dir),
                        "--logfile", str(self.dir / "redis.log")], check=True)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        with contextlib.suppress(redis.exceptions.ConnectionError):  # SHUTDOWN closes its own connection
            redis.Redis.from_url(self.url).shutdown(nosave=True)


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_down_then_back_recovers_without_restarts(own_redis, make_settings, label_studio, voc_config, tmp_path):
    settings = make_settings(redis_url=own_redis.url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.legacy_token)  # fmt: skip
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        wait_for_workers(settings, worker, tmp_path / "worker.log")
        client = create_app(settings).test_client()
        body = {"tasks": [{"id": 1, "data": {"image": label_studio.upload_path("2011_000003.jpg")}}],
                "label_config": voc_config}  # fmt: skip
        assert client.post("/predict", json=body).status_code == 200

        own_redis.stop()
        down = client.post("/predict", json=body)
        assert down.status_code == 503 and "unreachable" in down.get_json()["error"]
        assert client.get("/health").status_code == 503

        own_redis.start()  # empty: no persistence, so the worker must register itself again
        deadline = time.monotonic() + 120
        while (
            answer := client.post("/predict", json={**body, "tasks": [{**body["tasks"][0], "id": 2}]})
        ).status_code != 200:
            assert time.monotonic() < deadline, answer.get_json()
            time.sleep(1)
        assert answer.get_json()["results"][0]["result"]
        assert worker.poll() is None  # the same worker process, never restarted
    finally:
        stop(worker)


def test_redis_gone_just_as_a_job_ends_does_not_end_the_worker(own_redis, make_settings):
    """RQ's work loop waits for Redis only around its dequeue: Redis away for longer than redis-py's
    own retries (about 3 s) just as a job ended killed the worker (the heartbeat after the job, the
    suspension check). Now the real work loop waits for Redis and registers the worker again, as
    it was at birth: its healthcheck (``prelabel-worker --check``, by host) passes again."""
    after_restart: dict[str, object] = {}

    def come_back() -> None:
        try:
            own_redis.start()  # empty: the worker must register itself again
            connection = redis.Redis.from_url(own_redis.url)
            deadline = time.monotonic() + 15
            with connection:
                while time.monotonic() < deadline:
                    if names := [w.name for w in Worker.all(connection=connection)]:
                        after_restart["workers"] = names
                        after_restart["check"] = check(make_settings(redis_url=own_redis.url), [PREDICT_QUEUE])
                        return
                    time.sleep(0.2)
        except Exception as e:  # a Timer thread's error is otherwise lost
            after_restart["error"] = e

    back = threading.Timer(5, come_back)

    class RedisGoesAwayAfterAJob(PrelabelWorker):
        def execute_job(self, job, queue):
            super().execute_job(job, queue)
            own_redis.stop()
            back.start()

    connection = redis.Redis.from_url(own_redis.url)
    queue = Queue(PREDICT_QUEUE, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
    queue.enqueue(PREDICT_FUNCTION, {})  # fails at once (no payload), which ends it like any job
    worker = RedisGoesAwayAfterAJob([PREDICT_QUEUE], connection=connection, serializer=JSONSerializer, worker_ttl=60)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # work() installs its own
    try:
        assert worker.work(max_idle_time=10)  # True: it ran the job; returns once idle for 10 s
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if back.is_alive():
            back.join()
        connection.close()
    assert after_restart == {"workers": [worker.name], "check": None}


def test_a_worker_killed_mid_job_has_its_job_retried_by_another(redis_url, make_settings, label_studio, tmp_path):
    settings = make_settings(redis_url=redis_url, job_timeout=5, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.legacy_token)  # fmt: skip
    label_studio.serve_slowly("/data/upload/1/slow.jpg", "2011_000003.jpg", 3, "image/jpeg")
    workers = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        wait_for_workers(settings, workers[0], tmp_path / "worker0.log", count=2)
        runner = QueueRunner(settings)
        control = ChoicesControl("tags", "image", (ClassLabel("cat", ("cat",)), ClassLabel("dog", ("dog",))), True)
        job_id = runner.submit(
            PredictJob(settings.model_version, "image", (control,), (ImageTask(1, "/data/upload/1/slow.jpg"),))
        )
        connection = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while (job := Job.fetch(job_id, connection=connection, serializer=JSONSerializer)).worker_name is None:
            assert time.monotonic() < deadline, "no worker took the job"
            time.sleep(0.1)
        pid = int(connection.hget(f"rq:worker:{job.worker_name}", "pid"))
        victim = next(w for w in workers if w.pid == pid)
        os.kill(victim.pid, signal.SIGKILL)  # mid-job: the image is still downloading

        result = runner.wait(job_id, time.monotonic() + 150)  # min(JOB_TIMEOUT, 30) + 60 s to notice, then a retry
        assert result.tasks[0].choices and not result.tasks[0].error
        survivor = next(w for w in workers if w is not victim)
        assert result.worker["pid"] == survivor.pid
    finally:
        for w in workers:
            stop(w)


def test_with_redis_down_every_route_but_health_answers_a_503_naming_redis(own_redis, make_settings, voc_config):
    settings = make_settings(redis_url=own_redis.url)
    client = create_app(settings).test_client()
    project = {"id": 4, "created_at": "2026-11-23T06:15:25Z", "label_config": voc_config}
    task = {"id": 1, "data": {"image": "/data/upload/1/a.jpg"}}
    routes = [
        ("post", "/setup", {"project": "4.1795414525", "schema": voc_config}),
        ("post", "/predict", {"tasks": [task], "label_config": voc_config, "project": "4.1795414525"}),
        ("post", "/predict", {"tasks": [task], "label_config": voc_config}),
        ("post", "/webhook", {"action": "START_TRAINING", "project": project}),
        ("post", "/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "task": 1}, "project": project}),
        ("post", "/webhook", {"action": "TASKS_CREATED", "tasks": [task], "project": project}),
        ("post", "/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": project}),
        ("get", "/versions?project=4.1795414525", None),
        ("post", f"/versions/{settings.model_version}/activate", {"project": "4.1795414525"}),
        ("get", "/jobs/some-job", None),
        ("post", "/jobs/some-job/cancel", {}),
        ("get", "/report", None),
        ("get", "/metrics", None),
    ]
    assert client.get("/health").status_code == 200
    own_redis.stop()
    for method, path, body in routes:
        response = client.post(path, json=body) if method == "post" else client.get(path)
        error = response.get_json()["error"]
        assert response.status_code == 503 and f"Redis at {own_redis.url} is unreachable" in error, (path, error)
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "DOWN"


def test_a_trainer_killed_mid_run_frees_its_project_to_train_again(redis_url, make_settings, label_studio, tmp_path):
    """A training run whose worker dies (OOM, a redeploy's SIGKILL) is failed about 90 s after its
    last heartbeat, with a reason, and the project can train again; it used to stay "started" for
    TRAIN_TIMEOUT (4 h) and every trigger in between was ignored."""
    settings = make_settings(redis_url=redis_url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.legacy_token)  # fmt: skip
    asked, release = threading.Event(), threading.Event()

    def hold(handler):  # Label Studio slow to list the corrections: the run is mid-way when killed
        asked.set()
        release.wait(120)
        handler._send(200, b"[]")

    label_studio.extra_routes["/api/tasks/"] = label_studio.extra_routes["/api/tasks"] = hold
    trainer = start_worker(settings, tmp_path / "trainer.log", "train")
    try:
        wait_for_workers(settings, trainer, tmp_path / "trainer.log")
        client = create_app(settings).test_client()
        project = {"id": 4, "created_at": "2026-11-23T06:15:25Z", "title": "photos", "label_config": CONFIG}
        start = {"action": "START_TRAINING", "project": project}
        first = client.post("/webhook", json=start).get_json()
        assert first["status"] == "queued", first
        assert asked.wait(60), (tmp_path / "trainer.log").read_text()
        assert client.post("/webhook", json=start).get_json()["status"] == "already queued"  # it is running
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()

        deadline = time.monotonic() + 150  # 90 s after the last heartbeat (every 30 s)
        while (again := client.post("/webhook", json=start).get_json())["status"] != "queued":
            assert time.monotonic() < deadline, "the dead trainer's run still blocks the project"
            time.sleep(2)
        assert again["job"] != first["job"]
        shown = client.get(f"/jobs/{first['job']}").get_json()
        assert shown["status"] == "failed" and "stopped mid-job" in shown["error"][0]
    finally:
        release.set()
        stop(trainer)
