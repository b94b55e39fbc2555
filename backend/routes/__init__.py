"""The backend's HTTP routes, one blueprint per audience:

* ``protocol``: what Label Studio calls (PROTOCOL.md): /health, /setup, /predict, /webhook;
* ``admin``: what a project manager calls: model versions, activation, training jobs;
* ``metrics``: what operators and dashboards read: /metrics (Prometheus), /report;
* ``dashboard``: the project manager's page, /dashboard.

Handlers validate, hand work to the runner or a queue, and answer within Label Studio's timeouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Request, request

from common.errors import BadRequest, NotFound
from common.projects import project_uid


def json_body() -> dict[str, Any]:
    body = parsed_json(request)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def parsed_json(source: Request) -> Any:
    """The request's JSON, or None when it is not JSON; a body nested too deeply for the parser
    (its RecursionError escapes Flask's ``silent``) is a bad request too."""
    try:
        return source.get_json(silent=True)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None


def optional_project(value: Any) -> str | None:
    """A project uid from a request field, or None when the field is absent or empty."""
    return project_uid(value) if value not in (None, "") else None


def known_project(value: Any, known: Callable[[], Iterable[str]]) -> str | None:
    """A project from a query string: its uid (``<id>.<created_at>``), or Label Studio's plain
    project id, which names the newest project of that id prelabel knows (a project re-created
    after a database reset has a new uid). None when absent."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        matches = [uid for uid in known() if uid.split(".")[0] == value.lstrip("0")]
        if not matches:
            raise NotFound(
                f"prelabel knows no Label Studio project {value[:20]}: it learns of a project when Label Studio "
                "connects to it (/setup) or sends its first annotation."
            )
        return max(matches, key=lambda uid: int(uid.split(".")[1]))
    return optional_project(value)
