"""Late predict jobs as deliveries in Redis (``backend/deliveries.py``): owned by one live backend
process, taken over by exactly one other when it dies, never lost to an expired record."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from label_studio_sdk.core.api_error import ApiError
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from backend import deliveries as deliveries_module
from backend.deliveries import Deliveries, Delivery
from backend.runner import QueueRunner
from backend.serving import RedisCache, Server, post_failure, predict_job
from common import keys
from common.errors import JobFailed
from common.jobs import PREDICT_FUNCTION, AllowListedJob
from common.labelstudio.config import parse_label_config
from worker import tasks as tasks_module
from worker.cli import PrelabelWorker

CONFIG = """<View>
  <Image name="photo" value="$image"/>
  <Choices name="tags" toName="photo" choice="multiple"><Choice value="cat"/><Choice value="dog"/></Choices>
  <BrushLabels name="masks" toName="photo"><Label value="cat"/></BrushLabels>
</View>"""


def delivery(job_id: str) -> Delivery:
    spec = parse_label_config(CONFIG, 100)
    tasks = [{"id": 7, "data": {"image": "/data/upload/1/a.jpg"}}, {"id": 8, "data": {"image": "s3://b/c.png"}}]
    job = predict_job(spec, "3.1700000000", "v1", tasks, [t["data"]["image"] for t in tasks], {"tag_min_score": 0.2})
    return Delivery(job_id, job, spec, [f"prelabel:cache:v1:{t['id']}:abc" for t in tasks])


def die(process: Deliveries) -> None:
    """What ALIVE_TTL seconds without a heartbeat do."""
    process.connection.delete(keys.backend_alive(process.process))


def test_a_dead_processes_deliveries_go_to_exactly_one_live_process_whole(redis_url):
    connection = redis.Redis.from_url(redis_url)
    dead, first, second = (Deliveries(connection, ttl=600) for _ in range(3))
    dead.record(delivery("job-1"))
    dead.record(delivery("job-2"))
    first.beat()
    second.beat()
    assert first.take(set()) == second.take(set()) == []  # its owner is alive

    die(dead)
    taken = first.take(set())
    # the job, its label spec and cache keys, as recorded (their jobs are not in RQ: nothing to wait for)
    assert sorted(taken, key=lambda d: d.job_id) == [delivery("job-1"), delivery("job-2")]
    assert second.take(set()) == []  # one taker only
    assert dead.taken_by_another("job-1") and not first.taken_by_another("job-1")

    dead.done("job-1")  # the dead process's thread, still waiting, cannot end what it no longer owns
    assert connection.hget(keys.DELIVERIES, "job-1").decode() == first.process
    assert connection.exists(keys.delivery("job-1"))
    first.done("job-1")
    assert not connection.hexists(keys.DELIVERIES, "job-1") and not connection.exists(keys.delivery("job-1"))


def test_a_process_takes_back_its_own_deliveries_only_when_no_thread_of_it_holds_them(redis_url):
    connection = redis.Redis.from_url(redis_url)
    owner = Deliveries(connection, ttl=600)
    owner.record(delivery("job-1"))
    assert owner.take({"job-1"}) == []
    assert owner.take(set()) == [delivery("job-1")]  # its thread gave up waiting, or Redis was away


def test_an_expired_record_ends_its_delivery(redis_url):
    connection = redis.Redis.from_url(redis_url)
    dead, live = Deliveries(connection, ttl=600), Deliveries(connection, ttl=600)
    dead.record(delivery("job-1"))
    assert 0 < connection.ttl(keys.delivery("job-1")) <= 600
    connection.delete(keys.delivery("job-1"))
    die(dead)
    assert live.take(set()) == []
    assert connection.hlen(keys.DELIVERIES) == 0


def test_a_process_that_dies_between_caching_and_posting_leaves_the_posts_to_its_heir(redis_url):
    """What a delivery cached (and so alone may post) is in its record before it posts: the heir
    posts those from the cache, where it would otherwise find them cached and post nothing."""
    connection = redis.Redis.from_url(redis_url)
    dead, heir = Deliveries(connection, ttl=600), Deliveries(connection, ttl=600)
    recorded = delivery("job-1")
    dead.record(recorded)
    assert dead.cached(recorded, recorded.cache_keys[:1]).unposted == tuple(recorded.cache_keys[:1])
    die(dead)
    (taken,) = heir.take(set())
    assert taken.unposted == tuple(recorded.cache_keys[:1]) and taken.attempts == 0
    assert taken.job == recorded.job


def test_a_delivery_label_studio_did_not_take_waits_a_growing_delay_then_posts_what_is_left(redis_url, monkeypatch):
    """Postponed: the record keeps the cache keys still to post and its expiry (Label Studio away
    for longer than that loses the posts, not Redis memory); it is not handed out before its time,
    then handed out with them; each failure doubles the delay, up to MAX_RETRY_DELAY; ending it
    leaves nothing behind."""
    clock = [1_000_000.0]
    monkeypatch.setattr(deliveries_module.time, "time", lambda: clock[0])
    connection = redis.Redis.from_url(redis_url)
    owner, other = Deliveries(connection, ttl=600), Deliveries(connection, ttl=600)
    first = delivery("job-1")
    owner.record(first)
    connection.expire(keys.delivery("job-1"), 500)  # time has passed since it was recorded
    assert owner.postpone(first, first.cache_keys[1:]) == deliveries_module.RETRY_DELAY
    assert 0 < connection.ttl(keys.delivery("job-1")) <= 500
    assert owner.take(set()) == []
    clock[0] += deliveries_module.RETRY_DELAY
    (again,) = owner.take(set())
    assert (again.unposted, again.attempts) == (tuple(first.cache_keys[1:]), 1)
    assert again.job == first.job and again.cache_keys == first.cache_keys

    delays = [owner.postpone(again, list(again.unposted))]
    for _ in range(8):
        clock[0] += delays[-1]
        (again,) = owner.take(set())
        delays.append(owner.postpone(again, list(again.unposted)))
    assert delays[:3] == [2 * deliveries_module.RETRY_DELAY, 4 * deliveries_module.RETRY_DELAY,
                          8 * deliveries_module.RETRY_DELAY]  # fmt: skip
    assert max(delays) == delays[-1] == deliveries_module.MAX_RETRY_DELAY

    assert other.postpone(again, []) is None and other.cached(again, []) is None  # not its delivery
    clock[0] += deliveries_module.MAX_RETRY_DELAY
    (again,) = owner.take(set())
    assert again.unposted == tuple(first.cache_keys[1:])
    owner.done("job-1")
    assert not connection.exists(keys.DELIVERIES, keys.delivery("job-1"), keys.DELIVERY_RETRIES)


def test_each_heartbeat_hands_out_a_bounded_number(redis_url, monkeypatch):
    monkeypatch.setattr(deliveries_module, "MAX_DISPATCHED", 2)
    connection = redis.Redis.from_url(redis_url)
    dead, live = Deliveries(connection, ttl=600), Deliveries(connection, ttl=600)
    for n in range(3):
        dead.record(delivery(f"job-{n}"))
    die(dead)
    first = live.take(set())
    assert len(first) == 2
    second = live.take({d.job_id for d in first})  # the next heartbeat, its threads on the first two
    assert [d.job_id for d in second] == sorted({"job-0", "job-1", "job-2"} - {d.job_id for d in first})


def test_a_delivery_goes_to_a_thread_only_once_its_job_is_done(redis_url):
    """Taken over at once, handed out when RQ has run the job: a thread never waits on a job
    queued behind a whole import."""
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("deliveries-test", connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
    job = queue.enqueue_call(PREDICT_FUNCTION, args=({},))  # fails at once: done all the same
    dead, live = Deliveries(connection, ttl=600), Deliveries(connection, ttl=600)
    dead.record(delivery(job.id))
    die(dead)
    assert live.take(set()) == []  # queued
    assert connection.hget(keys.DELIVERIES, job.id).decode() == live.process  # ... but taken over
    PrelabelWorker([queue], connection=connection, serializer=JSONSerializer).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert live.take(set()) == [delivery(job.id)]


def test_a_canceled_jobs_delivery_ends_without_a_post(redis_url, make_settings):
    """Waiting for a canceled (or expired) job ends its delivery at once, instead of holding a
    thread for JOB_TIMEOUT and coming back every heartbeat."""
    settings = make_settings(redis_url=redis_url)
    connection = redis.Redis.from_url(redis_url)
    runner = QueueRunner(settings, connection)
    late = delivery("unused")
    job_id = runner.submit(late.job)
    Job.fetch(job_id, connection=connection, serializer=JSONSerializer).cancel()
    server = Server(settings, runner, RedisCache(connection), deliveries=Deliveries(connection, ttl=600))
    server.finish_later(job_id, late.job, late.spec, late.cache_keys)
    deadline = time.monotonic() + 10
    while connection.hlen(keys.DELIVERIES):
        assert time.monotonic() < deadline, "the canceled job's delivery did not end"
        time.sleep(0.05)
    assert not connection.exists(keys.delivery(job_id))
    assert RedisCache(connection).get_many(late.cache_keys) == [None, None]
    with pytest.raises(JobFailed, match="canceled"):
        runner.wait(job_id, time.monotonic() + 5)
    with pytest.raises(JobFailed, match="expired"):
        runner.wait("no-such-job", time.monotonic() + 5)


def test_label_studio_away_for_one_delivery_holds_the_others_back_without_a_request_each(
    redis_url, make_settings, caplog
):
    """Posts that find Label Studio away postpone their delivery; the other deliveries due then
    wait too, without a request each (a Label Studio that hangs would cost each a timeout): only
    those already posting on the other threads try."""
    listener = socket.create_server(("127.0.0.1", 0))
    hangups: list[int] = []

    def hang_up() -> None:  # a Label Studio that accepts and drops every connection
        while True:
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            hangups.append(1)
            peer.close()

    threading.Thread(target=hang_up, daemon=True).start()
    settings = make_settings(redis_url=redis_url, label_studio_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                             label_studio_api_key="0" * 40)  # fmt: skip
    connection = redis.Redis.from_url(redis_url)
    owner = Deliveries(connection, ttl=600)
    cache = RedisCache(connection)
    job_ids = [f"job-{n}" for n in range(12)]
    for job_id in job_ids:  # cached, not posted yet (no such job in RQ: done)
        late = delivery(job_id)
        owner.record(late)
        cache.put_many({k: {"result": [{"type": "choices"}], "score": 0.5, "model_version": "v1"}
                        for k in late.cache_keys})  # fmt: skip
        owner.cached(late, late.cache_keys)
    server = Server(settings, QueueRunner(settings, connection), cache, deliveries=owner)
    server.start_delivering()
    try:
        deadline = time.monotonic() + 30
        while connection.zcard(keys.DELIVERY_RETRIES) < len(job_ids):
            assert time.monotonic() < deadline, "the deliveries were not postponed"
            time.sleep(0.05)
    finally:
        server.stop_delivering()
        listener.close()
    # one failed post per thread at most, none for the others (12 without; connections are no
    # measure: the SDK retries some drops twice)
    failed = [r for r in caplog.records if r.getMessage().startswith("could not post the prediction")]
    assert hangups and 1 <= len(failed) <= server._background.workers < len(job_ids)
    assert connection.hlen(keys.DELIVERIES) == len(job_ids)  # kept, to post later
    for job_id in job_ids:
        assert json.loads(connection.get(keys.delivery(job_id)))["attempts"] == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (httpx.ConnectError("refused"), "away"),
        (httpx.ReadTimeout("no answer"), "away"),
        (ApiError(status_code=503), "away"),
        (ApiError(status_code=502), "away"),
        (ApiError(status_code=429), "away"),
        (ApiError(status_code=500), "later"),
        (ApiError(status_code=408), "later"),
        (ApiError(status_code=404), None),
        (ApiError(status_code=400), None),
        (ValueError("not a prediction"), None),
    ],
)
def test_which_failed_posts_are_tried_again(error, kind):
    """Label Studio down, overloaded or behind a proxy that says so: all posts wait. Its own error
    on one task: that post is tried again. A refusal (a deleted task, a bad prediction): not."""
    assert post_failure(error) == kind


@contextlib.contextmanager
def bulk_request_waiting(redis_url: str, make_settings, label_studio, photos) -> Iterator[tuple]:
    """A bulk request of two tasks (one job each) waiting in a thread while no worker runs its
    jobs yet. Yields the server, Redis, each task's (job id, cache key) as held, the request's
    outcome (its answer or its exception, once it ends) and a function that runs the queued jobs
    and waits for the request to end."""
    settings = make_settings(redis_url=redis_url, label_studio_url=label_studio.url,
                             label_studio_api_key=label_studio.legacy_token, max_tasks_per_job=1)  # fmt: skip
    connection = redis.Redis.from_url(redis_url)
    runner = QueueRunner(settings, connection)
    server = Server(settings, runner, RedisCache(connection), deliveries=Deliveries(connection, ttl=600))
    spec = parse_label_config(CONFIG, 100)
    tasks = [{"id": 20 + n, "data": {"image": label_studio.upload_path(name)}} for n, name in enumerate(photos)][:2]
    images = [t["data"]["image"] for t in tasks]
    listening = PrelabelWorker([runner.queue], connection=connection, serializer=JSONSerializer)
    listening.register_birth()  # a worker is there: the request queues its jobs and waits
    outcome: list = []

    def ask() -> None:
        try:
            outcome.append(server.predict(tasks, spec, CONFIG, "3.1", settings.model_version, images))
        except Exception as e:
            outcome.append(e)

    def run_jobs() -> None:
        tasks_module.configure(settings)
        PrelabelWorker([runner.queue], connection=connection, serializer=JSONSerializer).work(burst=True)
        request.join(timeout=30)
        assert not request.is_alive()

    request = threading.Thread(target=ask)
    request.start()
    try:
        deadline = time.monotonic() + 10
        while connection.hlen(keys.DELIVERIES) < len(tasks):
            assert time.monotonic() < deadline, "the request's jobs were not recorded as deliveries"
            time.sleep(0.05)
        held = {}
        for job_id in (j.decode() for j in connection.hkeys(keys.DELIVERIES)):
            body = json.loads(connection.get(keys.delivery(job_id)))
            held[body["job"]["tasks"][0]["task_id"]] = (job_id, body["cache_keys"][0])
        yield server, connection, held, outcome, run_jobs
    finally:
        listening.register_death()
        request.join(timeout=30)


def test_a_bulk_requests_jobs_are_deliveries_while_it_waits_and_end_when_it_answers(
    redis_url, make_settings, label_studio, photos
):
    """Retrieve Predictions on a selection: its jobs are deliveries from the moment they are
    queued, held by the request (no thread of its process takes them, no other process while it
    lives), so that a process dying while the request waits leaves them to another, which caches
    and posts them (tests/test_e2e.py). Answered, they end. A prediction another request cached
    meanwhile (an annotator opened the task) reached Label Studio then: it is not answered again."""
    with bulk_request_waiting(redis_url, make_settings, label_studio, photos) as (
        server, connection, held, outcome, run_jobs
    ):  # fmt: skip
        assert sorted(held) == [20, 21]
        assert {owner.decode() for owner in connection.hvals(keys.DELIVERIES)} == {server.deliveries.process}
        assert {job_id for job_id, _ in held.values()} <= server._handling  # no thread of its process takes them
        assert Deliveries(connection, ttl=600).take(set()) == []  # nor another process while it lives
        opened = {"result": [{"type": "choices"}], "score": 0.5, "model_version": "v1"}
        RedisCache(connection).put_many({held[20][1]: opened})  # task 20 opened meanwhile
        run_jobs()
    (served,) = outcome
    assert served.predictions[0] == [] and served.predictions[1]["result"]
    assert RedisCache(connection).get_many([held[20][1]]) == [opened]
    assert connection.hlen(keys.DELIVERIES) == 0  # nothing is left to post
    assert not list(connection.scan_iter(keys.delivery("*"))) and not server._handling


def test_a_bulk_request_that_fails_leaves_what_it_had_cached_to_post(redis_url, make_settings, label_studio, photos):
    """The first job answered and cached, the second canceled: the request fails, so Label Studio
    stores nothing from it. The first job's delivery stays, recording its prediction as cached
    and still to post; this process's heartbeat hands both out once their jobs are over."""
    with bulk_request_waiting(redis_url, make_settings, label_studio, photos) as (
        server, connection, held, outcome, run_jobs
    ):  # fmt: skip
        Job.fetch(held[21][0], connection=connection, serializer=JSONSerializer).cancel()
        run_jobs()
    (failed,) = outcome
    assert isinstance(failed, JobFailed) and "canceled" in str(failed)
    assert not server._handling
    taken = {d.job_id: d for d in server.deliveries.take(set())}
    assert taken[held[20][0]].unposted == (held[20][1],)  # posted from the cache by the heartbeat's thread
    assert taken[held[21][0]].unposted is None  # its thread finds the job canceled and ends it
    assert RedisCache(connection).get_many([held[20][1]]) != [None]
