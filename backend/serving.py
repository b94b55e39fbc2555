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
* In the queue mode each late job is also a delivery in Redis (``backend/deliveries.py``): when
  the backend process that waits for it dies, another (or its restart) posts its predictions.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import redis
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.request_options import RequestOptions

from backend.deliveries import HEARTBEAT, RETRY_DELAY, Deliveries, Delivery
from backend.runner import Runner
from common import keys
from common.errors import JobTimeout, PrelabelError, ServiceUnavailable
from common.jobs import ImageTask, PredictJob
from common.labelstudio.annotations import image_url
from common.labelstudio.client import describe_failure, label_studio_client
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

    def put_new(self, items: dict[str, Any]) -> set[str]:
        """Cache the items whose key holds nothing yet; returns those keys."""
        ...


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

    def put_new(self, items: dict[str, Any]) -> set[str]:
        pipe = self.connection.pipeline()
        for key, prediction in items.items():
            pipe.set(key, json.dumps(prediction), ex=CACHE_TTL, nx=True)
        return {key for key, written in zip(items, pipe.execute(), strict=True) if written}


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

    def put_new(self, items: dict[str, Any]) -> set[str]:
        with self._lock:
            new = {key: prediction for key, prediction in items.items() if key not in self._items}
        self.put_many(new)  # the embedded mode has one finisher per job: no other writes these meanwhile
        return set(new)


@dataclass(frozen=True)
class Served:
    """What /predict answers: one prediction per task ([] where not ready), how many came from
    the cache, and the id under which the rest is tracked (None for one task or none missing)."""

    predictions: list[Any]
    cached: int
    request: str | None


class Background:
    """A few threads for late jobs that, unlike ThreadPoolExecutor's, do not hold the process open
    at exit: a gunicorn worker told to stop waited for every thread still waiting on a job (up to
    JOB_TIMEOUT), past its graceful timeout, until SIGKILL. In the queue mode whatever a thread
    was doing is a delivery in Redis, finished by the process that takes it over; the embedded
    mode's late posts end with its process, as its jobs and its in-memory cache do."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def submit(self, function: Callable[..., None], *args: Any) -> None:
        with self._lock:  # started on first use: an app that never has a late job starts none
            if not self._started:
                for n in range(self.workers):
                    threading.Thread(target=self._run, name=f"prelabel-late-jobs-{n}", daemon=True).start()
                self._started = True
        self._calls.put(functools.partial(function, *args))

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:
                log.exception("late job thread: unexpected error")


class Server:
    """Answers /predict from the cache and the runner, and finishes late jobs in the background."""

    def __init__(
        self, settings: Settings, runner: Runner, cache: PredictionCache, posted: Remember | None = None,
        deliveries: Deliveries | None = None,
    ) -> None:  # fmt: skip
        """``posted`` hears of the predictions posted to Label Studio in the background (the
        correction report compares them with what annotators make of them). ``deliveries`` (the
        queue mode) keeps late jobs in Redis, so that no backend restart loses them."""
        self.settings = settings
        self.runner = runner
        self.cache = cache
        self.posted = posted
        self.deliveries = deliveries
        self._background = Background(workers=4)
        self._label_studio_away_until = 0.0  # monotonic: posts wait until then (found away)
        self._handling: set[str] = set()  # late jobs this process has a thread (or a queued one) for
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def predict(
        self, tasks: list[dict], spec: LabelSpec, label_config: str, project: str | None, version: str,
        images: list[str | None], project_settings: dict[str, Any] | None = None,
    ) -> Served:  # fmt: skip
        """One prediction per task, in order ([] for a task not ready yet), from ``version`` with
        the project's own settings (extra_params).

        The missing tasks become jobs of at most MAX_TASKS_PER_JOB tasks. A runner that takes
        background work (the queue) gets them all at once, a single task (an annotator opening
        it) ahead of queued bulk work; a job not done by PREDICT_TIMEOUT is finished later,
        cached and posted to Label Studio, as is a bulk request's job whose process dies while
        the request waits (``_hold``). The embedded runner, which runs one job at a time,
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
        held: dict[str, Delivery] = {}  # this request's jobs recorded as deliveries (bulk, queue mode)
        answered: list[str] = []
        try:
            if not interactive:
                self._hold(ids, jobs, spec, cache_keys, held)
            for n, (chunk, job) in enumerate(jobs):
                if not ids and time.monotonic() >= deadline:
                    break
                job_id = ids[n] if ids else self.runner.submit(job)
                try:
                    result = self.runner.wait(job_id, deadline=deadline)
                except JobTimeout as e:
                    log.warning("%s; its %d tasks will be posted to Label Studio when done", e, len(chunk))
                    held.pop(job_id, None)  # its delivery's thread has it now
                    self.finish_later(job_id, job, spec, [cache_keys[i] for i in chunk])
                    continue
                except PrelabelError:  # this request fails; the jobs already queued still finish
                    for (later, later_job), later_id in zip(jobs[n + 1 :], ids[n + 1 :], strict=False):
                        held.pop(later_id, None)
                        self.finish_later(later_id, later_job, spec, [cache_keys[i] for i in later])
                    raise
                fresh = to_label_studio(result, spec, result.model_version)
                made = {cache_keys[i]: p for i, p in zip(chunk, fresh, strict=True) if p}
                if job_id in held:
                    first = self._cache_held(held[job_id], made)
                    fresh = [p if cache_keys[i] in first else [] for i, p in zip(chunk, fresh, strict=True)]
                    answered.append(job_id)
                else:
                    self.cache.put_many(made)
                for i, p in zip(chunk, fresh, strict=True):
                    answers[i] = p
            self._collect(elsewhere, tasks, cache_keys, answers, spec, deadline)
            for job_id in answered:  # the answer carries their predictions: nothing left to post
                del held[job_id]
                self._release(job_id, ended=True)
        finally:
            for job_id in held:  # not answered: this process's heartbeat posts them once their jobs end
                self._release(job_id, ended=False)
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

    def _hold(
        self, ids: list[str], jobs: list[tuple[Sequence[int], PredictJob]], spec: LabelSpec, cache_keys: list[str],
        held: dict[str, Delivery],
    ) -> None:  # fmt: skip
        """Record a bulk request's own jobs as deliveries (into ``held``) while it waits for them,
        held by the request (no thread of this process takes them): should this process die
        before it answers, the one that takes them over caches and posts their predictions, which
        Label Studio's call never receives. Single tasks are not recorded: an annotator who opens
        the task again asks again, and the round trips would be on every opened task's path."""
        if self.deliveries is None:
            return
        for job_id, (chunk, job) in zip(ids, jobs, strict=True):
            delivery = Delivery(job_id, job, spec, [cache_keys[i] for i in chunk])
            with self._lock:
                self._handling.add(job_id)
            held[job_id] = delivery
            try:
                self.deliveries.record(delivery)
            except redis.exceptions.RedisError as e:  # the request still answers with it, if it lives
                log.warning("predict job %s: delivery not recorded in Redis (a crash now would lose its "
                            "predictions until asked again): %s", job_id, e)  # fmt: skip

    def _cache_held(self, delivery: Delivery, made: dict[str, Any]) -> set[str]:
        """Cache a held job's predictions and return the keys this request was first to cache,
        the ones it answers with. The others reached Label Studio another way (an annotator's
        request, a delivery of a process that took this one's over), as deliveries post only what
        they were first to cache. The delivery records them as still to post, should the request
        never answer (this process dies, a later job fails)."""
        first = self.cache.put_new(made)
        unposted = [key for key in delivery.cache_keys if key in first]
        try:
            if self.deliveries is not None and self.deliveries.cached(delivery, unposted) is None:
                log.info("predict job %s: another backend process took its delivery over", delivery.job_id)
        except redis.exceptions.RedisError as e:  # the request still answers with them, if it lives
            log.warning("predict job %s: what it cached is not recorded: %s", delivery.job_id, e)
        return first

    def _release(self, job_id: str, ended: bool) -> None:
        """The request is done with its held job: answered with it (``ended``: nothing left to
        post), or not, which leaves the delivery to this process's heartbeat once the job ends."""
        if ended:
            self._end(job_id)
        with self._lock:
            self._handling.discard(job_id)

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
        """Cache and post the job's predictions when it finishes, on a thread of this process
        and, in the queue mode, as a delivery another process takes over if this one dies."""
        delivery = Delivery(job_id, job, spec, cache_keys)
        with self._lock:
            self._handling.add(job_id)
        if self.deliveries is not None:
            try:
                self.deliveries.record(delivery)
            except redis.exceptions.RedisError as e:  # this process's thread still delivers it
                log.warning("predict job %s: delivery not recorded in Redis (a restart now would lose it): %s",
                            job_id, e)  # fmt: skip
        self._background.submit(self._deliver, delivery)

    def start_delivering(self) -> threading.Thread | None:
        """The queue mode's heartbeat: every HEARTBEAT seconds, this process shows it is alive and
        hands its threads the deliveries of dead processes, and its own that no thread holds any
        longer, as their jobs finish. On a clean exit it says it left, so others take over at once."""
        deliveries = self.deliveries
        if deliveries is None:
            return None

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    deliveries.beat()
                    with self._lock:
                        handling = set(self._handling)
                    for delivery in deliveries.take(handling):
                        with self._lock:  # finish_later may have added it since the copy
                            if delivery.job_id in self._handling:
                                continue
                            self._handling.add(delivery.job_id)
                        self._background.submit(self._deliver, delivery)
                except redis.exceptions.RedisError as e:  # Redis away for a while: try again next beat
                    log.warning("late predict jobs not checked: Redis: %s", e)
                except Exception:  # the heartbeat must outlive any one bad beat
                    log.exception("late predict jobs not checked")
                if self._stop.wait(HEARTBEAT):
                    return

        def leave() -> None:
            self._stop.set()  # no heartbeat after this one says it left
            with contextlib.suppress(redis.exceptions.RedisError):  # then the others wait ALIVE_TTL
                deliveries.leave()

        atexit.register(leave)
        thread = threading.Thread(target=loop, name="prelabel-deliveries", daemon=True)
        thread.start()
        return thread

    def stop_delivering(self) -> None:
        """Stop the heartbeat (tests: an app that is done with)."""
        self._stop.set()

    def _deliver(self, delivery: Delivery) -> None:
        """One thread's delivery of one late job. What is left in Redis is taken up again at a
        later heartbeat."""
        try:
            self._finish(delivery)
        except redis.exceptions.RedisError as e:
            log.warning("background predict job %s: Redis: %s; it is tried again later", delivery.job_id, e)
        except Exception:  # a bug, not a passing state: ended, not retried every heartbeat
            log.exception("background predict job %s: its predictions could not be delivered", delivery.job_id)
            self._end(delivery.job_id)
        finally:
            with self._lock:
                self._handling.discard(delivery.job_id)

    def _finish(self, delivery: Delivery) -> None:
        job_id, job = delivery.job_id, delivery.job
        answered = 0
        if delivery.unposted is None:
            cached = self._cache_result(delivery)
            if cached is None:
                return
            predictions, answered = cached
        else:  # cached at an earlier try (Label Studio was away), or by a process that died
            if self.deliveries is not None and self.deliveries.taken_by_another(job_id):
                log.info("background predict job %s: another backend process took it over and posts it", job_id)
                return
            found = dict(zip(delivery.unposted, self.cache.get_many(list(delivery.unposted)), strict=True))
            predictions = [found.get(k) or [] for k in delivery.cache_keys]
        if time.monotonic() < self._label_studio_away_until:  # found away by another delivery just now
            posted, unreached = {}, [i for i, p in enumerate(predictions) if p]
        else:
            posted, unreached = self._post(job, predictions)
        if posted and self.posted is not None and job.project:
            try:
                self.posted(job.project, posted)
            except redis.exceptions.RedisError as e:  # the report misses them; the predictions are posted
                log.warning("background predict job %s: posted predictions not remembered: %s", job_id, e)
        if delivery.unposted is None:
            log.info("background predict job %s done: %d predictions cached, %d posted to Label Studio (%d answered "
                     "meanwhile)", job_id, sum(1 for p in predictions if p), len(posted), answered)  # fmt: skip
        elif not unreached:
            log.info("background predict job %s: %d of %d cached predictions posted to Label Studio at try %d (tasks "
                     "holding one already skipped)", job_id, len(posted), len(delivery.unposted),
                     delivery.attempts + 1)  # fmt: skip
        if unreached and self.deliveries is not None:
            delay = self.deliveries.postpone(delivery, [delivery.cache_keys[i] for i in unreached])
            if delay is None:
                log.info("background predict job %s: another backend process took it over and posts it", job_id)
            else:
                log.warning("background predict job %s: %d predictions not posted, Label Studio is away; tried "
                            "again in %.0f s (served from the cache meanwhile)", job_id, len(unreached),
                            delay)  # fmt: skip
            return
        if unreached:
            log.warning("background predict job %s: %d predictions not posted, Label Studio is away; they are served "
                        "from the cache when their tasks are opened", job_id, len(unreached))  # fmt: skip
        self._end(job_id)

    def _cache_result(self, delivery: Delivery) -> tuple[list[Any], int] | None:
        """Wait for the job, cache its predictions, and return those to post (the ones this
        delivery was first to cache, [] for the rest) and how many others were cached already.
        None: nothing to post now (the delivery is ended, kept for later, or another process's)."""
        job_id = delivery.job_id
        try:
            result = self.runner.wait(job_id, deadline=time.monotonic() + self.settings.job_timeout + 60)
        except (JobTimeout, ServiceUnavailable) as e:  # not done yet, or Redis away
            kept = "; it is tried again when it is done" if self.deliveries is not None else ""
            log.warning("background predict job %s: nothing to post yet: %s%s", job_id, e, kept)
            return None
        except PrelabelError as e:  # failed, canceled or expired: nothing to post, the log says why
            log.warning("background predict job %s gave nothing to post: %s", job_id, e)
            self._end(job_id)
            return None
        if self.deliveries is not None and self.deliveries.taken_by_another(job_id):
            log.info("background predict job %s: another backend process took it over and posts it", job_id)
            return None
        predictions = to_label_studio(result, delivery.spec, result.model_version)
        # Only the predictions this delivery is first to cache are posted: one cached already was
        # in a request's answer (an annotator opened the task, or a request asking again collected
        # this job's result), or is another delivery's of the same job.
        made = {k: p for k, p in zip(delivery.cache_keys, predictions, strict=True) if p}
        fresh = self.cache.put_new(made)
        if self.deliveries is not None:
            try:  # first to cache them, this delivery posts them, whoever owns it now
                self.deliveries.cached(delivery, [k for k in delivery.cache_keys if k in fresh])
            except redis.exceptions.RedisError as e:  # this thread posts them still; a crash now would not
                log.warning("background predict job %s: what it cached is not recorded: %s", job_id, e)
        to_post = [p if k in fresh else [] for k, p in zip(delivery.cache_keys, predictions, strict=True)]
        return to_post, len(made) - len(fresh)

    def _end(self, job_id: str) -> None:
        """The delivery is over: posted, or nothing to post."""
        if self.deliveries is None:
            return
        try:
            self.deliveries.done(job_id)
        except redis.exceptions.RedisError as e:  # taken up again later, and then finds them cached
            log.warning("predict job %s: delivery not ended in Redis: %s", job_id, e)

    def _post(self, job: PredictJob, predictions: list[Any]) -> tuple[dict[Any, dict], list[int]]:
        """Post each prediction to its task, only when Label Studio says the task belongs to the
        job's project and still shows the image the prediction was made from (a forged
        TASKS_CREATED must not write into another project). Returns the posted ones by task id,
        and the indices of those not posted because Label Studio is away (to post later)."""
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key) or not job.project:
            return {}, []
        pid = project_id(job.project)
        posted: dict[Any, dict] = {}
        unreached: list[int] = []
        with label_studio_client(self.settings, "Posting predictions") as client:
            for i, (task, prediction) in enumerate(zip(job.tasks, predictions, strict=True)):
                if not prediction:
                    continue
                if time.monotonic() < self._label_studio_away_until:  # not a timeout for each task
                    unreached.append(i)
                    continue
                try:
                    # as stored, cloud storage URIs (s3://...) included, not as Label Studio's editor sees it
                    stored = client.tasks.get(str(int(task.task_id)), request_options=AS_STORED)
                    if stored.project != pid or (stored.data or {}).get(job.image_key) != task.image_url:
                        log.warning("task %s: prediction not posted: the task is not project %s's, or its image "
                                    "changed", task.task_id, pid)  # fmt: skip
                        continue
                    # Reading a task that has no prediction makes Label Studio ask /predict for it
                    # (with "show predictions to annotators" on): it may hold this one now.
                    versions = {p.model_version for p in getattr(stored, "predictions", None) or []}
                    if prediction["model_version"] in versions:
                        continue
                    client.predictions.create(
                        task=int(task.task_id),
                        result=prediction["result"],
                        score=prediction["score"],
                        model_version=prediction["model_version"],
                    )
                    posted[task.task_id] = prediction
                except Exception as e:  # one refused prediction does not stop the others
                    failure = post_failure(e)
                    if failure is not None:
                        unreached.append(i)
                    if failure == "away":  # the other deliveries wait too, instead of a timeout each
                        self._label_studio_away_until = time.monotonic() + RETRY_DELAY
                    log.warning("could not post the prediction of task %s to Label Studio: %s", task.task_id,
                                describe_failure(e))  # fmt: skip
        return posted, unreached


def post_failure(error: Exception) -> str | None:
    """Whether a post that raised ``error`` is worth trying again: "away" when Label Studio does
    not answer, or its proxy says it is down or rate-limits (no use asking for the next task now),
    "later" for an error of its own on this task (a 500, a 408), None when it refused the post."""
    if isinstance(error, httpx.TransportError):
        return "away"
    if isinstance(error, ApiError):
        if error.status_code is None or error.status_code in (429, 502, 503, 504):
            return "away"
        if error.status_code == 408 or error.status_code >= 500:
            return "later"
    return None


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
