"""The queue path for real: the backend enqueues on Redis, a `prelabel-worker` process (RQ's
SimpleWorker, model loaded once) runs the job, the backend returns its results."""

from __future__ import annotations

import dataclasses
import http.server
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from backend import events, job_index
from backend import runner as runner_module
from backend.app import create_app
from backend.runner import InlineRunner, QueueRunner
from backend.serving import cache_key
from bench import processes
from common import keys
from common.errors import JobTimeout
from common.jobs import PREDICT_FUNCTION, PREDICT_QUEUE, ChoicesControl, ClassLabel, ImageTask, PredictJob
from common.labelstudio.config import parse_label_config
from common.settings import Settings
from tests.conftest import claim_redis_db, settings_env
from tests.lsfake import FakeLabelStudio
from worker import tasks
from worker.cli import PrelabelWorker

PHOTOS = ["2011_000003.jpg", "120.png", "n02129604_tiger.JPEG", "n03792782_mountain_bike.JPEG"]


def start_worker(settings: Settings, log_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings)}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def wait_for_workers(settings: Settings, process: subprocess.Popen, log_path: Path, count: int = 1) -> None:
    connection = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 90
    while Worker.count(connection=connection) < count:
        if process.poll() is not None:
            pytest.fail(f"prelabel-worker exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"prelabel-worker did not register within 90 s:\n{log_path.read_text()}")
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM; a worker that has not exited 20 s later fails the test (after SIGKILL and reaping)."""
    assert not processes.stop(process, timeout=20), "prelabel-worker ignored SIGTERM for 20 s"


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, photos, tmp_path_factory) -> Iterator[tuple[Settings, FakeLabelStudio, Path]]:
    """A fake Label Studio, a claimed Redis database and one worker serving it, for this module."""
    label_studio = FakeLabelStudio(dict(photos)).start()
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with claim_redis_db() as url:
        settings = Settings(
            redis_url=url,
            model_checkpoint=str(tiny_checkpoint),
            image_size=64,
            batch_size=4,
            predict_timeout=60.0,
            distractors="none",  # the tiny model's scores are near uniform: tag most labels (conftest.py)
            tag_min_score=0.01,
            label_studio_url=label_studio.url,
            label_studio_api_key=label_studio.legacy_token,
        )
        process = start_worker(settings, log_path)
        try:
            wait_for_workers(settings, process, log_path)
            yield settings, label_studio, log_path
        finally:
            stop(process)
            label_studio.stop()


def _request(label_studio: FakeLabelStudio, config: str) -> dict:
    tasks = [{"id": i, "data": {"image": label_studio.upload_path(name)}} for i, name in enumerate(PHOTOS)]
    return {"tasks": tasks, "project": "3.1700000000", "label_config": config}


def test_queue_results_equal_embedded_results(stack, voc_config):
    settings, label_studio, _ = stack
    body = _request(label_studio, voc_config)
    queued = create_app(settings).test_client().post("/predict", json=body)
    assert queued.status_code == 200, queued.get_json()

    embedded_settings = dataclasses.replace(settings, redis_url=None)
    embedded = create_app(embedded_settings).test_client().post("/predict", json=body)
    assert embedded.status_code == 200

    queued_results, embedded_results = queued.get_json()["results"], embedded.get_json()["results"]
    assert len(queued_results) == len(PHOTOS)
    for q, e in zip(queued_results, embedded_results, strict=True):
        assert q["model_version"] == e["model_version"] == settings.model_version
        assert q["result"][0]["value"] == e["result"][0]["value"]
        assert q["score"] == pytest.approx(e["score"], abs=1e-3)


def test_one_worker_process_serves_many_jobs_with_the_model_loaded_once(stack, voc_config):
    settings, label_studio, log_path = stack
    runner = QueueRunner(settings)
    control = ChoicesControl("tags", "image", (ClassLabel("cat", ("cat",)), ClassLabel("dog", ("dog",))), True)
    job = PredictJob(settings.model_version, "image", (control,), (ImageTask(1, label_studio.upload_path(PHOTOS[0])),))
    first, second = (runner.wait(runner.submit(job), time.monotonic() + 60) for _ in range(2))
    assert first.worker["pid"] == second.worker["pid"]
    assert first.worker["model_loaded_at"] == second.worker["model_loaded_at"] is not None
    assert first.tasks == second.tasks
    assert "timings" in log_path.read_text()  # the worker logs each job with its timings


def test_worker_rejects_a_job_for_another_model_version(stack, voc_config):
    settings, label_studio, _ = stack
    other = dataclasses.replace(settings, tag_threshold=0.3)  # a different version string
    response = create_app(other).test_client().post("/predict", json=_request(label_studio, voc_config))
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert f"serves model version {settings.model_version}" in error and "same MODEL_*" in error


def test_a_slow_batch_answers_what_is_ready_and_finishes_in_the_background(stack, voc_config):
    settings, label_studio, _ = stack
    label_studio.serve_slowly("/data/upload/1/slow.png", PHOTOS[1], 2.5)
    impatient = dataclasses.replace(settings, predict_timeout=1.0)
    client = create_app(impatient).test_client()
    fast = {"id": 1, "data": {"image": label_studio.upload_path(PHOTOS[0])}}
    slow_task = {"id": 2, "data": {"image": "/data/upload/1/slow.png"}}
    patient = create_app(settings).test_client()  # the fast task cached first, however busy the machine
    assert patient.post("/predict", json={"tasks": [fast], "label_config": voc_config}).status_code == 200

    response = client.post("/predict", json={"tasks": [fast, slow_task], "label_config": voc_config})
    assert response.status_code == 200  # within PREDICT_TIMEOUT, not a 504
    ready, pending = response.get_json()["results"]
    assert ready["result"] and pending == []  # the cached task now, the slow one later

    deadline = time.monotonic() + 30
    while True:
        both = client.post("/predict", json={"tasks": [fast, slow_task], "label_config": voc_config})
        results = both.get_json()["results"]
        if all(results):
            break
        assert time.monotonic() < deadline, "the background job never filled the cache"
        time.sleep(0.5)
    assert results[0] == ready and results[1]["result"]


def test_health_shows_queue_and_workers(stack):
    settings, _, _ = stack
    client = create_app(settings).test_client()
    queue = Queue(PREDICT_QUEUE, connection=redis.Redis.from_url(settings.redis_url), serializer=JSONSerializer)
    deadline = time.monotonic() + 60
    while queue.count:  # jobs the previous test's polling queued for its slow task, on a busy host
        assert time.monotonic() < deadline, "the worker never emptied the queue"
        time.sleep(0.2)
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["mode"] == "queue"
    assert body["workers"]["count"] == 1
    assert body["queue"] == {"name": "predict", "pending": 0}  # the worker is idle


def test_the_worker_healthcheck_finds_this_hosts_live_worker(stack):
    """`prelabel-worker --check` (docker-compose's healthcheck) passes for a served queue and fails,
    saying why, for a queue nobody serves or a Redis that does not answer."""
    settings, _, _ = stack
    env = {**os.environ, **settings_env(settings)}

    def check(*args: str, **changes) -> subprocess.CompletedProcess:
        run_env = {**env, **settings_env(dataclasses.replace(settings, **changes))} if changes else env
        return subprocess.run([sys.executable, "-m", "worker.cli", "--check", *args], env=run_env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    assert check().returncode == 0
    missing = check("train")
    assert missing.returncode == 1 and "serves queue 'train'" in missing.stderr
    down = check(redis_url="redis://:pw@127.0.0.1:1/0")
    assert down.returncode == 1 and "unreachable" in down.stderr and ":pw@" not in down.stderr


def test_no_worker_gives_a_clear_503(redis_url, make_settings, voc_config):
    client = create_app(make_settings(redis_url=redis_url)).test_client()
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.jpg"}}], "label_config": voc_config}
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    assert "No prelabel-worker is listening on queue 'predict'" in response.get_json()["error"]


def test_redis_down_gives_503_without_leaking_the_password(make_settings, voc_config):
    settings = make_settings(redis_url="redis://:hunter2@127.0.0.1:1/0")  # nothing listens on port 1
    client = create_app(settings).test_client()
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "DOWN"
    body = {"tasks": [{"id": 1, "data": {"image": "/x.jpg"}}], "label_config": voc_config}
    response = client.post("/predict", json=body)
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert "unreachable" in error and "hunter2" not in error and "***@127.0.0.1:1" in error


def test_worker_stops_with_a_clear_message_when_the_model_is_missing(redis_url, tmp_path, make_settings):
    settings = make_settings(redis_url=redis_url, model_checkpoint=str(tmp_path / "nowhere"))
    log_path = tmp_path / "worker.log"
    process = start_worker(settings, log_path)
    assert process.wait(timeout=90) == 1
    assert "prelabel-worker: MODEL_CHECKPOINT=" in log_path.read_text()
    assert "does not exist" in log_path.read_text()


def _job(settings: Settings, label_studio: FakeLabelStudio) -> PredictJob:
    control = ChoicesControl("tags", "image", tuple(ClassLabel(c, (c,)) for c in ("cat", "dog", "person")), True)
    tasks = tuple(ImageTask(i, label_studio.upload_path(name)) for i, name in enumerate(PHOTOS))
    return PredictJob(settings.model_version, "image", (control,), tasks)


def test_burst_worker_in_process_runs_what_the_backend_enqueued(redis_url, make_settings, label_studio):
    settings = make_settings(
        redis_url=redis_url, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token
    )
    runner = QueueRunner(settings)
    job_id = runner.submit(_job(settings, label_studio))
    assert runner.queue.count == 1

    tasks.configure(settings)
    PrelabelWorker([runner.queue], connection=runner.connection, serializer=JSONSerializer).work(burst=True)
    queued = runner.wait(job_id, time.monotonic() + 10)

    inline = InlineRunner(dataclasses.replace(settings, redis_url=None))
    embedded = inline.wait(inline.submit(_job(settings, label_studio)), time.monotonic() + 60)
    assert [t.task_id for t in queued.tasks] == list(range(len(PHOTOS)))
    for q, e in zip(queued.tasks, embedded.tasks, strict=True):
        assert q.choices[0].selected == e.choices[0].selected
        assert q.choices[0].scores == pytest.approx(e.choices[0].scores, abs=1e-5)


def test_a_job_keeps_its_place_when_the_wait_ends(redis_url, make_settings, label_studio):
    settings = make_settings(redis_url=redis_url, predict_timeout=1.0)
    runner = QueueRunner(settings)
    job_id = runner.submit(_job(settings, label_studio))
    with pytest.raises(JobTimeout, match="keeps running"):
        runner.wait(job_id, time.monotonic() + settings.predict_timeout)
    job = Job.fetch(job_id, connection=runner.connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and runner.queue.count == 1


def test_a_single_task_goes_ahead_of_queued_bulk_chunks(redis_url, make_settings, label_studio):
    settings = make_settings(
        redis_url=redis_url, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token
    )
    runner = QueueRunner(settings)
    bulk = [runner.submit(_job(settings, label_studio)) for _ in range(3)]
    single = runner.submit(_job(settings, label_studio), interactive=True)
    assert runner.queue.job_ids == [single, *bulk]  # the next free worker takes the annotator's task

    request = runner.track(bulk, [len(PHOTOS)] * 3, "3.1700000000")
    waiting = runner.progress(request)
    assert waiting["status"] == "queued" and waiting["tasks"] == 12 and waiting["tasks_done"] == 0
    assert waiting["chunks"] == {"total": 3, "queued": 3, "started": 0, "finished": 0, "failed": 0, "canceled": 0,
                                 "expired": 0}  # fmt: skip
    runner.connection.expire(keys.predict_request(request), 5)
    runner.progress(request)  # asked while chunks wait: kept as long as a failed chunk would be
    assert runner.connection.ttl(keys.predict_request(request)) > 5

    tasks.configure(settings)
    PrelabelWorker([runner.queue], connection=runner.connection, serializer=JSONSerializer).work(burst=True)
    ended = {job_id: Job.fetch(job_id, connection=runner.connection).ended_at for job_id in [single, *bulk]}
    assert ended[single] < min(ended[job_id] for job_id in bulk)
    done = runner.progress(request)
    assert done["status"] == "finished" and done["tasks_done"] == 12 and done["chunks"]["finished"] == 3
    assert runner.progress("request-unknown") is None

    canceled = runner.submit(_job(settings, label_studio))
    Job.fetch(canceled, connection=runner.connection, serializer=JSONSerializer).cancel()
    mixed = runner.progress(runner.track([bulk[0], canceled], [4, 4], "3.1700000000"))
    assert mixed["status"] == "canceled" and mixed["tasks_done"] == 4 and mixed["chunks"]["canceled"] == 1


def test_an_opened_task_is_answered_while_a_bulk_selection_waits(stack, voc_config):
    """One worker, a selection of 8 chunks whose images are slow to download, and an annotator
    opening another task meanwhile: the task is answered while chunks of the selection still wait."""
    settings, label_studio, _ = stack
    label_studio.serve_slowly("/data/upload/1/slow-bulk.png", PHOTOS[1], 0.4)
    chunked = dataclasses.replace(settings, max_tasks_per_job=2)
    bulk = [{"id": 500 + i, "data": {"image": f"/data/upload/1/slow-bulk.png?{i}"}} for i in range(16)]
    runner = QueueRunner(chunked)
    answers = []
    selection = threading.Thread(target=lambda: answers.append(create_app(chunked).test_client().post(
        "/predict", json={"tasks": bulk, "label_config": voc_config, "project": "3.1700000000"})))  # fmt: skip
    selection.start()
    deadline = time.monotonic() + 30
    while runner.queue.count < 6:  # the selection's chunks are queued and the worker is on the first
        assert time.monotonic() < deadline, "the selection never reached the queue"
        time.sleep(0.02)
    opened = {"id": 600, "data": {"image": label_studio.upload_path(PHOTOS[2])}}
    answer = create_app(chunked).test_client().post("/predict", json={"tasks": [opened], "label_config": voc_config})
    still_waiting = runner.queue.count
    assert answer.get_json()["results"][0]["result"]
    assert still_waiting >= 4, "the opened task waited behind the selection"
    selection.join(timeout=120)
    response = answers[0]
    assert all(response.get_json()["results"])
    progress = create_app(chunked).test_client().get(f"/jobs/{response.headers['X-Prelabel-Request']}").get_json()
    assert progress["status"] == "finished" and progress["tasks_done"] == 16 and progress["chunks"]["total"] == 8


def test_imported_tasks_are_precomputed_into_the_cache(stack, voc_config, monkeypatch):
    settings, label_studio, _ = stack
    app = create_app(settings)
    client = app.test_client()
    project = {"id": 8, "created_at": "2026-11-23T06:15:25Z", "label_config": voc_config}
    tasks = [{"id": 80 + i, "data": {"image": label_studio.upload_path(name)}} for i, name in enumerate(PHOTOS[:2])]
    answer = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks, "project": project}).get_json()
    assert answer["status"] == "precomputing" and answer["request"].startswith("request-")

    server = app.extensions["prelabel"].server
    keys = [cache_key(settings.model_version, voc_config, t["id"], t["data"]["image"]) for t in tasks]
    deadline = time.monotonic() + 30
    while not all(server.cache.get_many(keys)):
        assert time.monotonic() < deadline, "precomputed predictions never reached the cache"
        time.sleep(0.2)
    again = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks, "project": project}).get_json()
    assert again["status"] == "cached" and again["request"] is None
    finished = client.get(f"/jobs/{answer['request']}").get_json()
    assert finished["status"] == "finished" and finished["tasks_done"] == 2 and finished["chunks"]["finished"] == 1
    results = client.post("/predict", json={"tasks": tasks, "label_config": voc_config,
                                            "project": "8.1795414525"}).get_json()["results"]  # fmt: skip
    assert results == server.cache.get_many(keys)

    # An import's precomputation is bounded (an event can list millions of ids); the rest wait to be opened.
    monkeypatch.setattr(events, "MAX_PRECOMPUTE_TASKS", 1)
    more = [{"id": 90 + i, "data": {"image": label_studio.upload_path(name)}} for i, name in enumerate(PHOTOS[2:4])]
    capped = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": more, "project": project}).get_json()
    assert capped["not_precomputed"] == 1
    assert client.get(f"/jobs/{capped['request']}").get_json()["tasks"] == 1


def test_the_late_jobs_of_a_backend_that_died_are_delivered_by_another(stack, voc_config, tmp_path, caplog):
    """An import precomputed while no worker runs; the backend process that queued it stops
    beating (dead, or hung: its thread here still waits); another takes over the delivery, and
    when a worker has run the job, it caches the predictions. The first, if it wakes, does not."""
    caplog.set_level(logging.INFO, logger="backend")
    _, label_studio, _ = stack
    tasks = [{"id": 95 + i, "data": {"image": label_studio.upload_path(name)}} for i, name in enumerate(PHOTOS[:2])]
    with claim_redis_db() as url:
        settings = dataclasses.replace(stack[0], redis_url=url)
        connection = redis.Redis.from_url(url)
        dying = create_app(settings).extensions["prelabel"].server
        dying.precompute(tasks, parse_label_config(voc_config, settings.max_labels), voc_config, "9.1763878525",
                         settings.model_version, {})  # fmt: skip
        (job_id,) = [j.decode() for j in connection.hkeys(keys.DELIVERIES)]
        assert connection.hget(keys.DELIVERIES, job_id).decode() == dying.deliveries.process
        connection.delete(keys.backend_alive(dying.deliveries.process))

        heir = create_app(settings).extensions["prelabel"].server
        heir.start_delivering()
        worker = None
        try:
            deadline = time.monotonic() + 10
            while connection.hget(keys.DELIVERIES, job_id).decode() != heir.deliveries.process:
                assert time.monotonic() < deadline, "the delivery was not taken over"
                time.sleep(0.1)
            worker = start_worker(settings, tmp_path / "worker.log")
            cache_keys = [cache_key(settings.model_version, voc_config, t["id"], t["data"]["image"]) for t in tasks]
            deadline = time.monotonic() + 60
            while connection.hlen(keys.DELIVERIES) or "took it over" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text[-3000:]
                time.sleep(0.2)
            assert all(p and p["result"] for p in heir.cache.get_many(cache_keys))
            assert f"background predict job {job_id}: another backend process took it over" in caplog.text
            assert caplog.text.count(f"background predict job {job_id} done: 2 predictions cached") == 1
        finally:
            heir.stop_delivering()
            if worker is not None:
                stop(worker)


@pytest.fixture
def hook_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback server that records every request: where RQ's job webhooks would go."""
    hooked: list[str] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hooked.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", hooked
    server.shutdown()
    server.server_close()


def test_a_worker_runs_only_prelabels_job_functions(redis_url, tmp_path, hook_server):
    """RQ runs whatever dotted name a job in Redis carries; prelabel's worker refuses all but its own."""
    url, hooked = hook_server
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(PREDICT_QUEUE, connection=connection, serializer=JSONSerializer)
    hook = [Webhook(url, job_status=status) for status in ("failed", "finished")]
    planted = queue.enqueue_call("os.makedirs", args=(str(tmp_path / "planted"),), webhooks=hook)
    PrelabelWorker([queue], connection=connection, serializer=JSONSerializer).work(burst=True)
    assert not (tmp_path / "planted").exists() and hooked == []
    assert planted.get_status(refresh=True) == JobStatus.FAILED
    assert "prelabel runs only worker.tasks.predict" in planted.latest_result().exc_string

    control = queue.enqueue_call("os.makedirs", args=(str(tmp_path / "control"),), webhooks=hook)
    SimpleWorker([queue], connection=connection, serializer=JSONSerializer).work(burst=True)  # RQ's own
    assert control.get_status(refresh=True) == JobStatus.FINISHED and (tmp_path / "control").is_dir()
    assert hooked == ["/hook"]


def test_the_backend_cleaning_abandoned_jobs_sends_no_webhook_a_job_lists(redis_url, make_settings, hook_server,
                                                                         monkeypatch):  # fmt: skip
    """While /predict waits, the backend hands abandoned jobs to RQ's failed registry; a job planted
    in Redis as abandoned must not make it call a callback or request a webhook."""
    url, hooked = hook_server
    connection = redis.Redis.from_url(redis_url)

    def plant() -> Job:
        job = Job.create(PREDICT_FUNCTION, args=({},), connection=connection, serializer=JSONSerializer,
                         origin=PREDICT_QUEUE, webhooks=[Webhook(url, "failed")])  # fmt: skip
        job.set_status(JobStatus.STARTED)
        job.save()
        connection.zadd(f"rq:wip:{PREDICT_QUEUE}", {f"{job.id}:exec1": time.time() - 100})  # long expired
        return job

    planted = plant()
    monkeypatch.setattr(runner_module, "ABANDONED_CHECK", 1)
    runner = QueueRunner(make_settings(redis_url=redis_url))
    waiting = runner.submit(PredictJob("v", "image", (), (ImageTask(1, None),)))  # no worker: never done
    with pytest.raises(JobTimeout):
        runner.wait(waiting, time.monotonic() + 2.5)
    assert planted.get_status(refresh=True) == JobStatus.FAILED  # the cleanup ran ...
    assert hooked == []  # ... and requested nothing

    plant()
    StartedJobRegistry(queue=Queue(PREDICT_QUEUE, connection=connection, serializer=JSONSerializer)).cleanup()
    assert hooked == ["/hook"]  # RQ's plain job class would have


def test_abandoned_jobs_are_cleaned_only_up_to_the_first_whose_worker_is_still_registered(redis_url):
    """A job expired on its worker's clock but whose worker is still registered in Redis (a clock
    that runs ahead) keeps running; the jobs of dead workers expired before it are retried now,
    and those after it once it is done or its worker is gone too."""
    connection = redis.Redis.from_url(redis_url)
    alive = PrelabelWorker([PREDICT_QUEUE], connection=connection, serializer=JSONSerializer, name="alive")
    alive.register_birth()

    def plant(worker: str, expired_ago: float) -> Job:
        job = Job.create(PREDICT_FUNCTION, args=({},), connection=connection, serializer=JSONSerializer,
                         origin=PREDICT_QUEUE)  # fmt: skip
        job.worker_name = worker
        job.set_status(JobStatus.STARTED)
        job.save()
        connection.zadd(f"rq:wip:{PREDICT_QUEUE}", {f"{job.id}:exec1": time.time() - expired_ago})
        return job

    first, kept, after = plant("dead-1", 100), plant("alive", 50), plant("dead-2", 10)
    job_index.fail_abandoned(connection, (PREDICT_QUEUE,))
    statuses = [j.get_status(refresh=True) for j in (first, kept, after)]
    assert statuses == [JobStatus.FAILED, JobStatus.STARTED, JobStatus.STARTED]
    alive.register_death()
    connection.delete(alive.key)
    job_index.fail_abandoned(connection, (PREDICT_QUEUE,))
    assert [j.get_status(refresh=True) for j in (kept, after)] == [JobStatus.FAILED, JobStatus.FAILED]


def test_a_warm_shutdown_does_not_wait_a_minute_for_the_command_listener(redis_url):
    """RQ unsubscribes its command listener, then stops it. A listener thread that takes the
    unsubscribe reply in between (here: the main thread loses the CPU for 0.2 s, as on a busy
    host) waits again for up to 60 s, and redis-py's stop() waits for it. RQ's own SimpleWorker
    takes the full minute here."""
    worker = PrelabelWorker([PREDICT_QUEUE], connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    worker.subscribe()
    deadline = time.monotonic() + 10
    while not worker.pubsub.subscribed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    send_unsubscribe = worker.pubsub.unsubscribe

    def unsubscribe_then_lose_the_cpu(*args):
        sent = send_unsubscribe(*args)
        time.sleep(0.2)
        return sent

    worker.pubsub.unsubscribe = unsubscribe_then_lose_the_cpu
    started = time.monotonic()
    worker.unsubscribe()
    took = time.monotonic() - started
    worker.pubsub_thread.join(timeout=90)  # on failure, let the listener end before the next test
    assert took < 5 and not worker.pubsub_thread.is_alive()


def _wait_for_log(caplog, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{caplog.text[-3000:]}"
        time.sleep(0.1)


def _post_attempts(label_studio: FakeLabelStudio, task_id: int) -> int:
    """How often prelabel looked a task up to post a prediction to it (it reads the task first)."""
    return sum(1 for path, _ in label_studio.requests if path.rstrip("/") == f"/api/tasks/{task_id}")


def test_asking_again_while_a_job_runs_waits_for_it(stack, voc_config, caplog):
    """Retrieve Predictions clicked twice: the second request waits for the first one's job instead
    of queuing the same work, and answers with its predictions."""
    settings, label_studio, _ = stack
    caplog.set_level("INFO", logger="backend.serving")
    label_studio.serve_slowly("/data/upload/1/again.png", PHOTOS[1], 3)
    tasks = [{"id": 31, "data": {"image": "/data/upload/1/again.png"}},
             {"id": 32, "data": {"image": label_studio.upload_path(PHOTOS[2])}}]  # fmt: skip
    body = {"tasks": tasks, "label_config": voc_config, "project": "3.1700000000"}
    finished = Queue(PREDICT_QUEUE, connection=redis.Redis.from_url(settings.redis_url),
                     serializer=JSONSerializer).finished_job_registry  # fmt: skip
    before = set(finished.get_job_ids())

    first = create_app(dataclasses.replace(settings, predict_timeout=1.0)).test_client().post("/predict", json=body)
    assert first.get_json()["results"] == [[], []]  # the slow image is still downloading
    again = create_app(settings).test_client().post("/predict", json=body).get_json()["results"]

    (job_id,) = set(finished.get_job_ids()) - before  # one job served both requests
    _wait_for_log(caplog, f"background predict job {job_id} done")
    assert sum(1 for path, _ in label_studio.requests if path == "/data/upload/1/again.png") == 1
    assert all(answer and answer["result"] for answer in again)


def test_an_opened_task_queued_in_a_bulk_job_gets_its_own_job_and_is_not_posted_again(stack, voc_config, caplog):
    """An annotator opens a task whose bulk job still waits in the queue: they do not wait behind
    it (their task gets a job at the front), and when the bulk job gets to it, the prediction
    already answered is not posted a second time."""
    settings, label_studio, _ = stack
    caplog.set_level("INFO", logger="backend.serving")
    label_studio.serve_slowly("/data/upload/1/busy.png", PHOTOS[1], 3)
    busy = {"id": 41, "data": {"image": "/data/upload/1/busy.png"}}
    opened = {"id": 42, "data": {"image": label_studio.upload_path(PHOTOS[3])}}
    bulk = create_app(dataclasses.replace(settings, predict_timeout=1.0, max_tasks_per_job=1)).test_client()
    response = bulk.post(
        "/predict", json={"tasks": [busy, opened], "label_config": voc_config, "project": "3.1700000000"}
    )
    assert response.get_json()["results"] == [[], []]  # the worker is on the slow task, the other waits
    request = create_app(settings).test_client().get(f"/jobs/{response.headers['X-Prelabel-Request']}").get_json()
    busy_job, opened_job = request["jobs"]

    answer = create_app(settings).test_client().post("/predict", json={"tasks": [opened], "label_config": voc_config})
    assert answer.get_json()["results"][0]["result"]  # its own job, ahead of the bulk one

    _wait_for_log(caplog, f"background predict job {opened_job} done")
    _wait_for_log(caplog, f"background predict job {busy_job} done")
    assert _post_attempts(label_studio, opened["id"]) == 0  # answered already: not posted again
    assert _post_attempts(label_studio, busy["id"]) == 1  # the control: the bulk job's other task is posted


def test_a_running_job_is_kept_registered_by_heartbeats_not_for_its_whole_timeout(redis_url, make_settings,
                                                                                  label_studio):  # fmt: skip
    """While a job runs, the worker renews its registration every job_monitoring_interval for
    about a minute more; RQ's SimpleWorker registered it once for JOB_TIMEOUT + 60 s, so a dead
    worker's job looked alive for that long."""
    settings = make_settings(redis_url=redis_url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.legacy_token)  # fmt: skip
    label_studio.serve_slowly("/data/upload/1/slow.png", PHOTOS[1], 3)
    runner = QueueRunner(settings)
    control = ChoicesControl("tags", "image", (ClassLabel("cat", ("cat",)), ClassLabel("dog", ("dog",))), True)
    runner.submit(PredictJob(settings.model_version, "image", (control,), (ImageTask(1, "/data/upload/1/slow.png"),)))
    registry = StartedJobRegistry(PREDICT_QUEUE, connection=runner.connection)
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            for _, expiry in runner.connection.zrange(registry.key, 0, -1, withscores=True):
                samples.append((time.time(), expiry))

    sampler = threading.Thread(target=sample)
    sampler.start()
    tasks.configure(settings)
    try:
        PrelabelWorker([runner.queue], connection=runner.connection, serializer=JSONSerializer,
                       job_monitoring_interval=1).work(burst=True)  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert samples, "the job was never seen running"
    assert all(expiry < at + 62 for at, expiry in samples)  # about a minute ahead, never JOB_TIMEOUT
    assert max(e for _, e in samples) - min(e for _, e in samples) >= 1.5  # renewed as the job ran
