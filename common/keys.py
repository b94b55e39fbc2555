"""Every Redis key prelabel writes, in one place (as RQ keeps its own in ``rq.keys``).

Keys name the project by its uid (``<id>.<created_at>``, see ``common.projects``) so that a
project re-created after a Label Studio database reset never inherits another's state. RQ's own
keys (queues, jobs, workers) start with ``rq:``; ours with ``prelabel:``.
"""

from __future__ import annotations

PREFIX = "prelabel:"

#: Hash project uid -> label config: what scheduled training runs read, having no request.
PROJECTS = PREFIX + "projects"
#: Hash Label Studio project id -> the uid PROJECTS keeps for it (one per id: a project re-created
#: after a database reset replaces the old one, and made-up creation times cannot pile up).
PROJECT_UIDS = PREFIX + "project-uids"
#: Set for a moment by the backend process that runs the scheduled training sweep.
SWEEP_LOCK = PREFIX + "sweep"
#: Hash worker name -> GPU bytes held after its last job (for /metrics).
GPU_MEMORY = PREFIX + "gpu-memory"
#: Annotations waiting to be compared with their prediction, and those being compared.
FEEDBACK_INBOX = PREFIX + "feedback:inbox"
FEEDBACK_PROCESSING = PREFIX + "feedback:processing"
#: Prefix of the per-project hashes of comparisons (``corrections(project)``).
CORRECTIONS_PREFIX = PREFIX + "corrections:"
#: Set of the projects that have comparisons (no scan of the keyspace to list them).
PROJECTS_WITH_CORRECTIONS = PREFIX + "projects-with-corrections"
#: Hash predict job id -> the backend process that caches and posts its predictions when it
#: finishes (``backend/deliveries.py``).
DELIVERIES = PREFIX + "deliveries"
#: Sorted set: the deliveries Label Studio did not take, by the Unix time they are tried again from.
DELIVERY_RETRIES = PREFIX + "delivery-retries"


#: Seconds a cancel request is kept (longer than any job asked to stop takes to notice it).
CANCEL_TTL = 24 * 3600


def cancel(job_id: str) -> str:
    """Exists while a running job is asked to stop (RQ cannot interrupt a job that runs inside
    the worker process, so training checks this key as it goes)."""
    return f"{PREFIX}cancel:{job_id}"


def active_version(project: str) -> str:
    """The version a project predicts with (the fast path; the registry's disk holds the record)."""
    return f"{PREFIX}active:{project}"


def cached_prediction(version: str, task_id: object, digest: str) -> str:
    """One task's served prediction, under the model version and a digest of config and image URL."""
    return f"{PREFIX}cache:{version}:{task_id}:{digest}"


def predicting(cache_key: str) -> str:
    """The id of the predict job computing the prediction ``cache_key`` will hold."""
    return f"{PREFIX}predicting:{cache_key.removeprefix(PREFIX)}"


def training_job(project: str) -> str:
    """The id of the project's latest training job (at most one is queued or running)."""
    return f"{PREFIX}training:{project}"


def training_lock(project: str) -> str:
    return f"{PREFIX}training-lock:{project}"


def new_corrections(project: str) -> str:
    """Corrections counted since the project's last training run (TRAIN_EVERY compares with it)."""
    return f"{PREFIX}new-corrections:{project}"


def adapt_job(project: str) -> str:
    """The id of the project's latest few-shot learner job (at most one is queued)."""
    return f"{PREFIX}adapt:{project}"


def adapt_corrections(project: str) -> str:
    """Corrections counted since the project's last few-shot learner job (ADAPT_EVERY compares with it)."""
    return f"{PREFIX}adapt-corrections:{project}"


def served_predictions(project: str) -> str:
    """Hash task id -> the prediction last served for it, kept to compare with its correction."""
    return f"{PREFIX}predictions:{project}"


def corrections(project: str) -> str:
    """Hash annotation id -> how its prediction fared (the correction report's rows)."""
    return CORRECTIONS_PREFIX + project


def correction_totals(project: str) -> str:
    """Hash of the project's correction aggregates per model version, kept as corrections arrive (for /metrics)."""
    return f"{PREFIX}correction-totals:{project}"


def delivery(job_id: str) -> str:
    """What caching and posting a late predict job's predictions needs: the job, its cache keys."""
    return f"{PREFIX}delivery:{job_id}"


def backend_alive(process: str) -> str:
    """Exists while backend process ``process`` lives (renewed by its heartbeat)."""
    return f"{PREFIX}backend:{process}"


def predict_request(request_id: str) -> str:
    """The predict jobs (chunks) of one bulk request, for its progress."""
    return f"{PREFIX}request:{request_id}"


#: Hash project uid -> the project's own settings (JSON), from the extra_params of its /setup.
PROJECT_SETTINGS = PREFIX + "project-settings"


def project_jobs(project: str) -> str:
    """Sorted set of the project's recent job and request ids, scored by when they were enqueued."""
    return f"{PREFIX}jobs:{project}"
