"""Talking to Label Studio with the service's API key: the SDK client (tasks, predictions,
webhooks) and the ``Authorization`` header for plain HTTP requests (the worker's image downloads,
which connect to addresses they vetted themselves and so cannot use the SDK).

Label Studio 1.23 takes two kinds of key (PROTOCOL.md section 1): a legacy token, sent as
``Token <key>``, and a personal access token, a JWT refresh token exchanged at
``/api/token/refresh/`` for short-lived access tokens sent as ``Bearer <access>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import certifi
import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from common.errors import ImageFetchError, ServiceUnavailable
from common.settings import Settings

log = logging.getLogger(__name__)

#: Seconds one SDK call may take (the SDK's own default); it retries connection errors and
#: 5xx answers twice, with exponential backoff.
SDK_TIMEOUT = 60.0

#: POSTs JSON to a path on Label Studio; returns (HTTP status, parsed JSON or None).
Post = Callable[[str, dict], tuple[int, object]]


@contextmanager
def label_studio_client(settings: Settings, purpose: str) -> Iterator[LabelStudio]:
    """The SDK client for ``LABEL_STUDIO_URL`` with the API key, its connections closed on leaving
    the ``with`` block (a worker runs for weeks); ``purpose`` says in the error what needs it when
    either setting is missing."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ServiceUnavailable(f"{purpose} needs Label Studio's API: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY.")
    with httpx.Client(timeout=SDK_TIMEOUT, verify=tls_context(settings)) as connections:
        yield LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key,
                          httpx_client=connections)  # fmt: skip


def tls_context(settings: Settings) -> ssl.SSLContext:
    """How HTTPS certificates are checked on every connection prelabel opens: against
    REQUESTS_CA_BUNDLE (an internal CA) or certifi's bundle, or not at all with VERIFY_SSL=false."""
    context = ssl.create_default_context(cafile=settings.ca_bundle or certifi.where())
    if not settings.verify_ssl:
        log.warning("VERIFY_SSL=false: HTTPS certificates are not checked (anyone on the path can read the API key)")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_failure(error: BaseException) -> str:
    """Why a call to Label Studio failed, for the operator's log: the cause and what to check,
    never the URL, a header or a body (which may carry the key or task data)."""
    if isinstance(error, ApiError):
        if error.status_code in (401, 403):
            return f"HTTP {error.status_code}: Label Studio refused the API key; check LABEL_STUDIO_API_KEY"
        return f"HTTP {error.status_code}" if error.status_code is not None else "ApiError without a status"
    if isinstance(error, httpx.TimeoutException):
        return f"{type(error).__name__}: no answer within {SDK_TIMEOUT:.0f} s"
    if isinstance(error, httpx.TransportError):
        verify = next((e for e in _causes(error) if isinstance(e, ssl.SSLCertVerificationError)), None)
        if verify is not None:
            return (f"its HTTPS certificate was not accepted ({verify.verify_message}); behind an internal CA, "
                    "set REQUESTS_CA_BUNDLE to the PEM file of its certificates")  # fmt: skip
        message = str(error)  # "[Errno 111] Connection refused", "Server disconnected without sending a response."
        if not message or "://" in message or "@" in message:  # a URL, perhaps a proxy's with its password
            return type(error).__name__
        return f"{type(error).__name__}: {message}"
    return type(error).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what raised it, as far as the chain goes (httpx wraps ssl's errors)."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_personal_access_token(key: str) -> bool:
    """Label Studio PATs are JWT refresh tokens (``eyJ...``); legacy tokens are 40 hex chars."""
    return key.count(".") == 2 and key.startswith("eyJ")


class LabelStudioAuth:
    """The Authorization header for Label Studio, refreshing a PAT's access token when needed.
    ``post`` sends the refresh request (through the caller's own vetted connection)."""

    def __init__(self, api_key: str | None, post: Post) -> None:
        self._key = api_key
        self._post = post
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0

    @property
    def uses_pat(self) -> bool:
        return bool(self._key) and is_personal_access_token(self._key or "")

    def headers(self) -> dict[str, str]:
        if not self._key:
            return {}
        if not self.uses_pat:
            return {"Authorization": f"Token {self._key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_expires:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        """Forget the access token (after a 401) so the next call refreshes it."""
        with self._lock:
            self._access = None

    def _refresh(self) -> None:
        status, body = self._post("/api/token/refresh/", {"refresh": self._key})
        access = body.get("access") if isinstance(body, dict) else None
        if status != 200 or not isinstance(access, str):
            raise ImageFetchError(
                f"Label Studio refused the personal access token (HTTP {status} from "
                "/api/token/refresh/): check LABEL_STUDIO_API_KEY; the token may be revoked or expired."
            )
        self._access = access
        self._access_expires = jwt_expiry(access) - 30


def jwt_expiry(token: str) -> float:
    """The ``exp`` claim of a JWT (not verified: Label Studio checks it), or 4 minutes from now."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return time.time() + 240
