"""Who may call what: HTTP Basic auth as Label Studio sends it, the per-project webhook secret
for Label Studio's event webhooks, and JSON bodies for every state change."""

from __future__ import annotations

import hmac

from flask import Request, Response, jsonify

from backend.routes import parsed_json
from backend.webhook_secret import SECRET_HEADER, project_secret, secret_project
from common.settings import Settings

#: Label Studio calls /health without credentials when listing backends; it reveals nothing secret.
PUBLIC_ENDPOINTS = frozenset({"protocol.health"})


def _same(given: str | None, expected: str | None) -> bool:
    return hmac.compare_digest((given or "").encode(), (expected or "").encode())


def check_request(request: Request, settings: Settings) -> Response | None:
    """Return the refusal for a request that may not go on, or None.

    * every POST carries a JSON body (``Content-Type: application/json``): a browser cannot send
      one cross-site without asking first, so a page a project manager visits cannot change state;
    * with basic auth configured, every route but /health needs it;
    * /webhook also takes the project's webhook secret (see backend/webhook_secret.py): Label Studio
      sends event webhooks without the basic auth it uses everywhere else.
    """
    if request.method == "POST" and not request.is_json:
        response = jsonify(error="Send a JSON body with Content-Type: application/json.")
        response.status_code = 415
        return response
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if request.endpoint == "protocol.webhook" and settings.webhook_secret:
        if _webhook_secret_matches(request, settings.webhook_secret):
            return None
        if not settings.auth_enabled:
            return _refuse(f"Webhooks need the project's {SECRET_HEADER} header (WEBHOOK_SECRET).")
    if not settings.auth_enabled:
        return None
    auth = request.authorization
    if auth is not None and auth.type == "basic":
        # Compare both fields every time, in constant time, so timing says nothing about which failed.
        user_ok = _same(auth.username, settings.basic_auth_user)
        pass_ok = _same(auth.password, settings.basic_auth_pass)
        if user_ok and pass_ok:
            return None
    message = "Authentication required: set the ML backend's basic auth user and password."
    if request.endpoint == "protocol.webhook":
        message += f" Label Studio's event webhooks carry no auth: set WEBHOOK_SECRET (header {SECRET_HEADER})."
    return _refuse(message)


def _webhook_secret_matches(request: Request, secret: str) -> bool:
    """The header names a project and holds its secret (so one project's webhook secret is worth
    nothing for another), and the event is about that project. The header is checked before the
    body is read: a request without a valid one costs no JSON parsing."""
    given = request.headers.get(SECRET_HEADER)
    claimed = secret_project(given)
    if claimed is None or not _same(given, project_secret(secret, claimed)):
        return False
    body = parsed_json(request)
    project = body.get("project") if isinstance(body, dict) else None
    pid = project.get("id") if isinstance(project, dict) else None
    return isinstance(pid, int) and not isinstance(pid, bool) and pid == claimed


def _refuse(message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="prelabel"'
    return response
