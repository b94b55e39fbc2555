"""Late predict jobs outlive the backend process that queued them.

A predict job that outlasts its request (a large selection, an import being precomputed) has its
predictions cached and posted to Label Studio by a backend thread when it finishes
(``backend/serving.py``). That thread dies with its process: a backend restarted or killed during
an import would leave the import's predictions in RQ, never posted. So each such job is also a
*delivery* in Redis: the job id -> the backend process that owns it (``keys.DELIVERIES``), and
what posting needs (``keys.delivery``).

Each backend process has a random id and keeps ``keys.backend_alive(id)`` for ALIVE_TTL seconds,
renewed every HEARTBEAT. Every HEARTBEAT it also takes over the deliveries whose owner is no longer
alive, one compare-and-set each, so that of several live processes exactly one takes each, and
finishes them as their jobs finish. A delivery ends when its predictions are posted, or its job failed or expired.
A delivery posts only the predictions it was first to cache (``PredictionCache.put_new``), so no
two post the same one, and records which those are before it posts: a process that dies in between
leaves them to the process that takes over, which posts them from the cache (skipping any task
that holds one already).

Label Studio away (restarting, a network cut) does not lose the posts either: the delivery then
keeps the cache keys it has not posted and is taken up again after a growing delay (RETRY_DELAY,
doubled each time up to MAX_RETRY_DELAY), posting from the cache, until its record expires.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass

import redis

from backend.job_index import job_statuses
from backend.runner import IN_FLIGHT_STATES
from common import keys
from common.jobs import PredictJob
from common.labelstudio.config import LabelSpec

log = logging.getLogger(__name__)

#: Seconds between a process's heartbeats, each also a look for deliveries to take over.
HEARTBEAT = 20
#: A process not heard of for this long is dead: its deliveries go to another.
ALIVE_TTL = 3 * HEARTBEAT
#: At most this many deliveries handed to threads per heartbeat (each holds its job's payload in
#: memory until posted): an import's deliveries go out over several heartbeats.
MAX_DISPATCHED = 500
#: Hash fields read per round trip when scanning the deliveries.
SCAN_COUNT = 1000

#: First wait before posting again to a Label Studio that was away, doubled at each failure.
RETRY_DELAY = HEARTBEAT
MAX_RETRY_DELAY = 15 * 60

#: Hand the delivery ARGV[1] from owner ARGV[2] to ARGV[3] if ARGV[2] still owns it; to nobody
#: ('') ends it, its record KEYS[2] and retry time in KEYS[3] included, in the same step.
_HAND_OVER = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('hdel', KEYS[1], ARGV[1])
  redis.call('del', KEYS[2])
  redis.call('zrem', KEYS[3], ARGV[1])
else
  redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
end
return 1
"""

#: If ARGV[2] still owns delivery ARGV[1]: rewrite its record KEYS[2] (its expiry kept) and, with
#: a time ARGV[4], set when it is tried again in KEYS[3]. Returns 0 when it is not, or no longer, its.
_REWRITE = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if not redis.call('set', KEYS[2], ARGV[3], 'XX', 'KEEPTTL') then return 0 end
if ARGV[4] ~= '' then redis.call('zadd', KEYS[3], ARGV[4], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """A predict job whose predictions are to be cached under ``cache_keys`` and posted.

    ``unposted``: None until the predictions are cached; then the cache keys of those this
    delivery is still to post, after ``attempts`` tries that found Label Studio away."""

    job_id: str
    job: PredictJob
    spec: LabelSpec
    cache_keys: list[str]
    unposted: tuple[str, ...] | None = None
    attempts: int = 0


class Deliveries:
    """This backend process's deliveries, in Redis."""

    def __init__(self, connection: redis.Redis, ttl: int) -> None:
        """``ttl``: how long a delivery is kept at most (as long as its job may still be queued)."""
        self.connection = connection
        self.ttl = ttl
        self.process = uuid.uuid4().hex
        self._hand_over = connection.register_script(_HAND_OVER)
        self._rewrite = connection.register_script(_REWRITE)

    def record(self, delivery: Delivery) -> None:
        """Own ``delivery`` (this process is alive as of now, whether its heartbeat runs yet or not)."""
        pipe = self.connection.pipeline()
        pipe.set(keys.backend_alive(self.process), 1, ex=ALIVE_TTL)
        pipe.set(keys.delivery(delivery.job_id), _body(delivery), ex=self.ttl)
        pipe.hset(keys.DELIVERIES, delivery.job_id, self.process)
        pipe.execute()

    def taken_by_another(self, job_id: str) -> bool:
        """Whether another process took the delivery over (this one's heartbeat lapsed): then
        that one posts it, not this."""
        owner = self.connection.hget(keys.DELIVERIES, job_id)
        return owner is not None and owner != self.process.encode()

    def cached(self, delivery: Delivery, unposted: list[str]) -> Delivery | None:
        """Record that the job's predictions are cached and which of them this delivery posts:
        should this process die before it has, the one that takes over posts them. Returns the
        delivery so recorded, or None when another process has taken it over meanwhile."""
        again = dataclasses.replace(delivery, unposted=tuple(unposted))
        return again if self._rewrite_record(again) else None

    def postpone(self, delivery: Delivery, unposted: list[str]) -> float | None:
        """Keep ``delivery`` with the cache keys of the predictions Label Studio did not take, to
        try again later; returns the seconds until then, or None when it is no longer this
        process's. Its record's expiry stays what it was: a Label Studio away for longer than
        that misses these posts (they stay cached)."""
        delay = min(RETRY_DELAY * 2**delivery.attempts, MAX_RETRY_DELAY)
        again = dataclasses.replace(delivery, unposted=tuple(unposted), attempts=delivery.attempts + 1)
        return delay if self._rewrite_record(again, retry_at=time.time() + delay) else None

    def _rewrite_record(self, delivery: Delivery, retry_at: float | None = None) -> bool:
        keys_ = [keys.DELIVERIES, keys.delivery(delivery.job_id), keys.DELIVERY_RETRIES]
        args = [delivery.job_id, self.process, _body(delivery), "" if retry_at is None else repr(retry_at)]
        return bool(self._rewrite(keys=keys_, args=args))

    def done(self, job_id: str) -> None:
        """End the delivery, if this process still owns it."""
        self._hand_over(keys=[keys.DELIVERIES, keys.delivery(job_id), keys.DELIVERY_RETRIES],
                        args=[job_id, self.process, ""])  # fmt: skip

    def beat(self) -> None:
        self.connection.set(keys.backend_alive(self.process), 1, ex=ALIVE_TTL)

    def leave(self) -> None:
        """This process stops (a deploy): the others need not wait ALIVE_TTL to take over."""
        self.connection.delete(keys.backend_alive(self.process))

    def take(self, handling: Collection[str]) -> list[Delivery]:
        """Take over the deliveries of processes no longer alive; return, up to MAX_DISPATCHED,
        this process's deliveries that no thread of it is ``handling`` (taken over, or left by a
        thread that gave up waiting or lost Redis) and whose job is no longer queued or running:
        a thread is given a job that is done, not one that may wait behind a whole import."""
        owners = {
            job.decode(): owner.decode()
            for job, owner in self.connection.hscan_iter(keys.DELIVERIES, count=SCAN_COUNT)
        }  # fmt: skip
        others = sorted(set(owners.values()) - {self.process})
        pipe = self.connection.pipeline(transaction=False)
        for owner in others:
            pipe.exists(keys.backend_alive(owner))
        dead = {owner for owner, alive in zip(others, pipe.execute(), strict=True) if not alive}
        orphans = [job_id for job_id, owner in owners.items() if owner in dead]
        pipe = self.connection.pipeline(transaction=False)
        for job_id in orphans:
            self._hand_over(keys=[keys.DELIVERIES, keys.delivery(job_id), keys.DELIVERY_RETRIES],
                            args=[job_id, owners[job_id], self.process], client=pipe)  # fmt: skip
        adopted = [job_id for job_id, won in zip(orphans, pipe.execute(), strict=True) if won]
        for job_id in adopted:
            log.info("delivery of predict job %s taken over from backend process %s", job_id, owners[job_id])
        mine = [j for j, owner in owners.items() if owner == self.process and j not in handling] + adopted
        later = {j.decode() for j in self.connection.zrangebyscore(keys.DELIVERY_RETRIES, f"({time.time()}", "+inf")}
        mine = [job_id for job_id in mine if job_id not in later]  # Label Studio was away: not yet
        statuses = job_statuses(self.connection, mine)
        ready = [job_id for job_id, status in zip(mine, statuses, strict=True) if status not in IN_FLIGHT_STATES]
        ready = ready[:MAX_DISPATCHED]
        taken = []
        for job_id, raw in zip(ready, self.connection.mget([keys.delivery(j) for j in ready]) if ready else [],
                               strict=True):  # fmt: skip
            delivery = self._read(job_id, raw)
            if delivery is None:
                self.done(job_id)
            else:
                taken.append(delivery)
        return taken

    def _read(self, job_id: str, raw: bytes | None) -> Delivery | None:
        """The delivery as recorded, or None when its record expired (or cannot be read)."""
        if raw is None:
            log.warning("delivery of predict job %s dropped: its record expired", job_id)
            return None
        try:
            body = json.loads(raw)
            job = PredictJob.from_dict(body["job"])
            spec = LabelSpec(body["image_name"], job.image_key, job.choices, job.brushes, job.regions)
            unposted = body.get("unposted")
            return Delivery(job_id, job, spec, [str(k) for k in body["cache_keys"]],
                            tuple(str(k) for k in unposted) if unposted is not None else None,
                            int(body.get("attempts", 0)))  # fmt: skip
        except Exception as e:  # written by another release, say: dropped, not retried every heartbeat
            log.warning("delivery of predict job %s dropped: unreadable record: %s", job_id, e)
            return None


def _body(delivery: Delivery) -> str:
    """The delivery's record: what posting it needs, the job itself included."""
    body: dict = {"job": delivery.job.to_dict(), "image_name": delivery.spec.image_name,
                  "cache_keys": delivery.cache_keys}  # fmt: skip
    if delivery.unposted is not None:
        body.update(unposted=list(delivery.unposted), attempts=delivery.attempts)
    return json.dumps(body)
