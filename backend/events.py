"""Label Studio's project events (PROTOCOL.md section 3), answered at once.

Label Studio gives event webhooks 1 second and START_TRAINING 100; with "start training on
annotation submission" the annotator's submit waits for the answer. So nothing here trains or
calls Label Studio: events are recorded and training is enqueued.
"""

from __future__ import annotations

import logging
from typing import Any

from backend.state import State
from common.errors import AnnotationError, BadRequest
from common.labelstudio.annotations import is_task
from common.labelstudio.config import LabelSpec, parse_label_config
from common.projects import project_uid

log = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
#: Tasks of one import queued for prediction (a 64 MB event can list millions of task ids): the
#: rest are predicted when opened or by Retrieve Predictions.
MAX_PRECOMPUTE_TASKS = 10_000


def handle(body: dict[str, Any], state: State) -> dict[str, Any]:
    action = body.get("action")
    if not isinstance(action, str):
        raise BadRequest("A webhook body needs an 'action' string.")
    if action == "START_TRAINING":
        project, spec = _project(body, state)
        job, created = state.require_training().enqueue(project, spec, "start_training")
        # Label Studio records a training job when the answer holds "job".
        return {"action": action, "status": "queued" if created else "already queued", "job": job.id}
    if action in ANNOTATION_EVENTS and state.training is not None and state.feedback is not None:
        project, spec = _project(body, state)
        annotations = body.get("annotation")
        annotations = annotations if isinstance(annotations, list) else [annotations]
        annotations = [a for a in annotations if isinstance(a, dict)]
        labels = {label.name for control in (*spec.choices, *spec.brushes, *spec.regions) for label in control.labels}
        queued, refused = state.feedback.accept(project, annotations, labels)
        job = state.training.corrections_arrived(project, queued, spec) if queued else None
        adapting = state.training.adapt_after(project, queued, spec) if queued else None
        log.info("webhook %s: project %s, %d annotations queued for comparison, %d refused", action, project,
                 queued, len(refused))  # fmt: skip
        if refused and not queued:
            raise AnnotationError("; ".join(r["error"] for r in refused[:5]))
        answer = {"action": action, "status": "recorded", "queued": queued, "job": job.id if job else None,
                  "few_shot_job": adapting.id if adapting else None}  # fmt: skip
        return answer | ({"refused": refused} if refused else {})
    if action == "TASKS_CREATED":
        project, spec = _project(body, state)
        tasks = [t for t in _list(body, "tasks") if is_task(t)]
        label_config = body["project"]["label_config"]
        if not state.runner.background:
            return {"action": action, "status": "ignored", "detail": "embedded mode predicts tasks when opened"}
        later = tasks[MAX_PRECOMPUTE_TASKS:]
        if later:
            log.warning("project %s: an import of %d tasks; the %d after the first %d are predicted when opened",
                        project, len(tasks), len(later), MAX_PRECOMPUTE_TASKS)  # fmt: skip
        own_settings = state.project_settings.get(project)
        request = state.server.precompute(tasks[:MAX_PRECOMPUTE_TASKS], spec, label_config, project,
                                          state.registry.active(project), own_settings)  # fmt: skip
        answer = {"action": action, "status": "precomputing" if request else "cached", "request": request}
        return answer | ({"not_precomputed": len(later)} if later else {})
    if action == "ANNOTATIONS_DELETED" and state.feedback is not None:
        project = project_uid(body.get("project"))
        ids = [a.get("id") for a in _list(body, "annotations") if isinstance(a, dict)]
        state.feedback.forget(project, ids)
        return {"action": action, "status": "recorded", "deleted": len(ids)}
    log.info("webhook %.60r acknowledged", action)
    return {"action": action, "status": "ignored"}


def _list(body: dict[str, Any], field: str) -> list[Any]:
    """A webhook's list field: empty when absent, a bad request when it is not a list."""
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"The webhook's {field!r} must be a list, not {type(value).__name__}.")
    return value


def _project(body: dict[str, Any], state: State) -> tuple[str, LabelSpec]:
    project = body.get("project")
    uid = project_uid(project)
    label_config = project.get("label_config") if isinstance(project, dict) else None
    if not label_config:
        raise BadRequest("The webhook's project object has no label_config.")
    spec = parse_label_config(label_config, state.settings.max_labels)
    if state.training is not None:
        state.training.remember_project(uid, label_config)
    return uid, spec
