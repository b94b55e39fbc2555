"""Prometheus metrics, the prometheus_client way.

* What happens in a backend process (``/predict`` answered, predict jobs waited for) is counted
  in histograms and counters. Under gunicorn they live in ``PROMETHEUS_MULTIPROC_DIR`` (set by
  ``prelabel-backend``), so a scrape sums every process; they start again at zero when the
  backend restarts, as Prometheus counters may (``rate()`` handles it).
* What Redis holds (queues, workers, GPU memory, and the corrections compared with their
  predictions) is read at scrape time by ``RedisCollector``: the same from every process, and the
  correction figures come from aggregates kept up to date as corrections arrive, so they survive
  restarts and a scrape never re-reads every correction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from backend.feedback import IOU_KINDS, Feedback
from common import keys
from common.jobs import ADAPT_QUEUE, PREDICT_QUEUE, TRAIN_QUEUE, AllowListedJob

#: Seconds: a cached answer takes milliseconds, a GPU batch a fraction of a second, a large
#: selection up to PREDICT_TIMEOUT (at most 100 s).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)

PREDICT_SECONDS = Histogram("prelabel_predict_seconds", "Time to answer /predict.", buckets=BUCKETS)
PREDICT_TASKS = Counter("prelabel_predict_tasks", "Tasks asked for in /predict calls.")
PREDICT_UNSERVED = Counter(
    "prelabel_predict_unserved_tasks", "Tasks answered without a prediction (image failed, or not ready in time)."
)
JOB_SECONDS = Histogram("prelabel_job_seconds", "Worker time of a predict job.", buckets=BUCKETS)
QUEUE_WAIT_SECONDS = Histogram(
    "prelabel_queue_wait_seconds", "Time a predict job waited in the queue for a worker.", buckets=BUCKETS
)


def record_predict(tasks: int, unserved: int, seconds: float) -> None:
    PREDICT_SECONDS.observe(seconds)
    PREDICT_TASKS.inc(tasks)
    PREDICT_UNSERVED.inc(unserved)


def record_job(timings_ms: dict[str, float]) -> None:
    """A finished predict job's timings, as its worker measured them (``total``, ``queued``)."""
    if "total" in timings_ms:
        JOB_SECONDS.observe(timings_ms["total"] / 1000)
    if "queued" in timings_ms:
        QUEUE_WAIT_SECONDS.observe(max(0.0, timings_ms["queued"] / 1000))


class RedisCollector:
    """Queues, workers, GPU memory and correction aggregates, read from Redis at scrape time.
    Per-label IoU is exported for each project's active version only (labels times versions
    would grow without end); ``active`` names it, as the project's predictions carry it."""

    def __init__(self, connection: redis.Redis, feedback: Feedback, active: Callable[[str], str]) -> None:
        self.connection = connection
        self.feedback = feedback
        self.active = active

    def collect(self) -> Iterator[Metric]:
        connection, feedback = self.connection, self.feedback
        depth = GaugeMetricFamily("prelabel_queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        workers = GaugeMetricFamily("prelabel_workers", "Workers listening on each queue.", labels=["queue"])
        for name in (PREDICT_QUEUE, ADAPT_QUEUE, TRAIN_QUEUE):
            queue = Queue(name, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
            depth.add_metric([name], queue.count)
            workers.add_metric([name], Worker.count(queue=queue))
        yield depth
        yield workers
        gpu = GaugeMetricFamily("prelabel_worker_gpu_memory_bytes", "GPU memory held by each worker after its "
                                "last job.", labels=["worker"])  # fmt: skip
        for worker, value in connection.hgetall(keys.GPU_MEMORY).items():
            gpu.add_metric([worker.decode()], float(value))
        yield gpu

        version_labels = ["project", "version"]
        corrections = GaugeMetricFamily("prelabel_corrections", "Annotations compared with their prediction.",
                                        labels=version_labels)  # fmt: skip
        unchanged = GaugeMetricFamily("prelabel_accepted_unchanged_ratio", "Share of predictions accepted as "
                                      "they were.", labels=version_labels)  # fmt: skip
        tags = GaugeMetricFamily("prelabel_tags", "Tags of predictions accepted, added or removed by annotators.",
                                 labels=[*version_labels, "outcome"])  # fmt: skip
        ious = {kind: GaugeMetricFamily(f"prelabel_{kind}", f"Mean IoU of predicted and corrected "
                                        f"{IOU_KINDS[kind].removesuffix('labels')} regions.",
                                        labels=[*version_labels, "label"])
                for kind in IOU_KINDS}  # fmt: skip
        for project in feedback.projects():
            active = self.active(project)
            for version, row in feedback.aggregates(project).items():
                if not row["corrections"]:
                    continue
                corrections.add_metric([project, version], row["corrections"])
                unchanged.add_metric([project, version], round(row["unchanged"] / row["corrections"], 4))
                for outcome in ("accepted", "added", "removed"):
                    tags.add_metric([project, version, outcome], row[f"tags_{outcome}"])
                for kind in IOU_KINDS:
                    for label, (total, count) in row[kind].items() if version == active else ():
                        if count:
                            ious[kind].add_metric([project, version, label], round(total / count, 4))
        yield from (corrections, unchanged, tags, *ious.values())


def render(multiprocess_dir: str | None, collector: RedisCollector | None) -> bytes:
    """The text a scrape gets: this process's metrics, or under gunicorn (``multiprocess_dir``)
    every process's, then Redis's (none in embedded mode)."""
    if multiprocess_dir:
        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes, path=multiprocess_dir)
    else:
        processes = REGISTRY
    if collector is None:
        return generate_latest(processes)
    from_redis = CollectorRegistry(auto_describe=False)
    from_redis.register(collector)
    return generate_latest(processes) + generate_latest(from_redis)
