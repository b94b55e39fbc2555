"""What a project manager calls: the model versions of a project, activating one (a manual
promotion or a rollback), and the progress of training and predict jobs."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, jsonify, request

from backend.job_index import failure, project_jobs
from backend.routes import json_body, known_project, optional_project
from backend.state import state
from common.errors import BadRequest, NotFound
from common.jobs import PREDICT_QUEUE
from common.settings import project_version

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__)


@bp.get("/versions")
def versions():
    """The versions Label Studio can show; ``?project=<uid>`` adds each version's report."""
    current = state()
    project = optional_project(request.args.get("project"))
    trained = current.registry.versions(project) if project else []
    active = current.registry.active(project)
    # as the project's predictions carry them: with its own settings (extra_params), if any
    own = current.project_settings.get(project)
    listed = [current.settings.model_version] + [v.version for v in trained]
    body: dict[str, Any] = {"versions": [project_version(v, own) for v in listed]}
    if project:
        body["active"] = current.served_version(project)
        body["details"] = [
            {"version": v.version, "created_at": v.created_at, "promoted": v.promoted, "reason": v.reason,
             "learner": (v.config or {}).get("learner", "training"), "metrics": v.metrics,
             "trained_on": len(v.trained_on), "active": v.version == active}
            for v in trained
        ]  # fmt: skip
    return jsonify(body)


@bp.post("/versions/<path:version>/activate")
def activate(version: str):
    """Make ``version`` (or the base model) the project's active one: rollback, or a manual promotion."""
    project = optional_project(json_body().get("project"))
    if project is None:
        raise BadRequest("Say which project: {'project': '<id>.<created_at>'} (as /setup receives it).")
    state().registry.activate(project, version)
    log.info("project %s: version %s activated by request", project, version)
    return jsonify(project=project, active=version)


@bp.get("/jobs")
def jobs():
    """A project's recent jobs, newest first: training runs, few-shot learner jobs, predict requests."""
    current = state()
    feedback = current.require_feedback()
    project = known_project(request.args.get("project"), feedback.projects)
    if project is None:
        raise BadRequest("Say which project: /jobs?project=<Label Studio project id>.")
    assert current.connection is not None  # feedback needs Redis
    return jsonify(project=project, jobs=project_jobs(current.connection, project, current.runner.progress))


@bp.get("/jobs/<job_id>")
def job_status(job_id: str):
    """A training run's progress and result, a predict job's status and task counts, or a bulk
    request's progress over all its chunks. Errors carry no URL query strings or userinfo."""
    current = state()
    if job_id.startswith("request-"):
        progress = current.runner.progress(job_id)
        if progress is None:
            raise NotFound(f"No request {job_id!r} (requests are kept RESULT_TTL seconds).")
        return jsonify(progress)
    job = current.require_training().job(job_id)
    status = job.get_status()
    result = job.latest_result()
    value = result.return_value if result is not None and result.type == result.Type.SUCCESSFUL else None
    if value is not None and job.origin == PREDICT_QUEUE:  # the masks are Label Studio's to show
        value = {"tasks": len(value["tasks"]), "failed": sum(1 for t in value["tasks"] if t.get("error"))}
    error = failure(result)
    return jsonify(
        id=job.id,
        description=job.description,
        status=status.value if status else None,
        progress=job.meta.get("progress"),
        enqueued_at=job.enqueued_at.isoformat() if job.enqueued_at else None,
        started_at=job.started_at.isoformat() if job.started_at else None,
        ended_at=job.ended_at.isoformat() if job.ended_at else None,
        result=value,
        error=[error] if error else None,
    )


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    return jsonify(state().require_training().cancel(job_id))
