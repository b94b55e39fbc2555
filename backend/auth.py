"""HTTP Basic auth, as Label Studio sends it when the ML backend is added with BASIC_AUTH."""

from __future__ import annotations

import hmac

from flask import Request, Response, jsonify

from backend.lswebhooks import SECRET_HEADER
from backend.settings import Settings

#: Label Studio calls /health without credentials when listing backends; it reveals nothing secret.
PUBLIC_ENDPOINTS = frozenset({"prelabel.health"})


def _same(given: str | None, expected: str | None) -> bool:
    return hmac.compare_digest((given or "").encode(), (expected or "").encode())


def check_basic_auth(request: Request, settings: Settings) -> Response | None:
    """Return a 401 response when auth is on and the request lacks the right credentials.

    /webhook also takes the WEBHOOK_SECRET header: Label Studio sends event webhooks without the
    basic auth it uses everywhere else (see backend/lswebhooks.py)."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if request.endpoint == "prelabel.webhook" and settings.webhook_secret:
        if _same(request.headers.get(SECRET_HEADER), settings.webhook_secret):
            return None
        if not settings.auth_enabled:
            return _refuse(f"Webhooks need the {SECRET_HEADER} header (WEBHOOK_SECRET).")
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
    if request.endpoint == "prelabel.webhook":
        message += f" Label Studio's event webhooks carry no auth: set WEBHOOK_SECRET (header {SECRET_HEADER})."
    return _refuse(message)


def _refuse(message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="prelabel"'
    return response
