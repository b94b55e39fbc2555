"""The backend's HTTP routes, one blueprint per audience:

* ``protocol``: what Label Studio calls (PROTOCOL.md): /health, /setup, /predict, /webhook;
* ``admin``: what a project manager calls: model versions, activation, training jobs;
* ``metrics``: what operators and dashboards read: /metrics (Prometheus), /report.

Handlers validate, hand work to the runner or a queue, and answer within Label Studio's timeouts.
"""

from __future__ import annotations

from typing import Any

from flask import request

from common.errors import BadRequest
from common.projects import project_uid


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def optional_project(value: Any) -> str | None:
    """A project uid from a request field, or None when the field is absent or empty."""
    return project_uid(value) if value not in (None, "") else None
