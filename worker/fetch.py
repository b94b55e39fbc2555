"""Download task images without becoming an SSRF proxy.

Task data is user input: an image URL may point anywhere. The rules:

* relative paths (``/data/upload/...``) and URLs on ``LABEL_STUDIO_URL`` go to Label Studio with
  its API key (``Token`` for a legacy token; a personal access token is exchanged for a short-lived
  ``Bearer`` access token and refreshed);
* other http(s) URLs only to ``ALLOWED_HOSTS`` (``*`` for any public host), and never to loopback,
  private, link-local or other non-public addresses unless ``ALLOW_INTERNAL_HOSTS`` is set;
* ``data:`` URIs are decoded in memory; ``file://`` and every other scheme is refused;
* every redirect hop is checked again; size and time are capped.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import ipaddress
import json
import logging
import socket
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit

import requests

from backend.errors import ImageFetchError
from backend.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_CHUNK = 256 * 1024


def is_personal_access_token(key: str) -> bool:
    """Label Studio PATs are JWT refresh tokens (``eyJ...``); legacy tokens are 40 hex chars."""
    return key.count(".") == 2 and key.startswith("eyJ")


class LabelStudioAuth:
    """The Authorization header for Label Studio, refreshing a PAT's access token when needed."""

    def __init__(self, base_url: str, api_key: str | None, session: requests.Session, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session
        self._timeout = timeout
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
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = self._session.post(url, json={"refresh": self._key}, timeout=self._timeout)
        except requests.RequestException as e:
            raise ImageFetchError(f"Could not reach Label Studio at {self.base_url} to refresh the token: {e}") from e
        if response.status_code != 200 or "access" not in _json_or_empty(response):
            raise ImageFetchError(
                f"Label Studio refused the personal access token (HTTP {response.status_code} from "
                "/api/token/refresh/): check LABEL_STUDIO_API_KEY; the token may be revoked or expired."
            )
        self._access = response.json()["access"]
        self._access_expires = _jwt_expiry(self._access) - 30


class ImageFetcher:
    """Fetch image bytes for a task, by the rules in this module's docstring."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.session.trust_env = False  # no proxies or .netrc credentials picked up by accident
        self.ls_origin = _origin(settings.label_studio_url) if settings.label_studio_url else None
        self.ls_auth = (
            LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key, self.session,
                            settings.fetch_timeout)
            if settings.label_studio_url
            else None
        )  # fmt: skip

    def fetch(self, url: str) -> bytes:
        """Return the bytes behind ``url``. Raises ImageFetchError with the reason."""
        url = url.strip()
        if url.startswith("data:"):
            return self._data_uri(url)
        if url.startswith("/"):
            if ".." in unquote(url):
                raise ImageFetchError(f"Refused a Label Studio path with '..' in it: {url[:80]}")
            if self.ls_auth is None:
                raise ImageFetchError(
                    f"The image is a path on Label Studio ({url[:80]}), but LABEL_STUDIO_URL is not set: "
                    "set it (and LABEL_STUDIO_API_KEY) so the worker can download it."
                )
            url = self.ls_auth.base_url + url
        deadline = time.monotonic() + self.settings.fetch_timeout
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, deadline)
            if not response.is_redirect:
                return self._read(response, url, deadline)
            location = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, location)
        raise ImageFetchError(f"Too many redirects (more than {MAX_REDIRECTS}) for the image URL.")

    def _get(self, url: str, deadline: float) -> requests.Response:
        to_label_studio = self._check(url)
        headers = self.ls_auth.headers() if to_label_studio and self.ls_auth else {}
        response = self._request(url, headers, deadline)
        if response.status_code == 401 and to_label_studio and self.ls_auth and self.ls_auth.uses_pat:
            response.close()
            self.ls_auth.invalidate()
            response = self._request(url, self.ls_auth.headers(), deadline)
        if response.status_code in (401, 403) and to_label_studio:
            raise ImageFetchError(
                f"Label Studio refused the image download (HTTP {response.status_code}): check "
                "LABEL_STUDIO_API_KEY. A legacy token only works when legacy tokens are enabled for the "
                "organisation; a personal access token works as is."
            )
        if response.status_code >= 400:
            raise ImageFetchError(f"The image URL answered HTTP {response.status_code}: {_short(url)}")
        return response

    def _request(self, url: str, headers: dict[str, str], deadline: float) -> requests.Response:
        timeout = max(0.1, deadline - time.monotonic())
        try:
            return self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                    timeout=(min(timeout, 5.0), timeout))  # fmt: skip
        except requests.Timeout as e:
            raise ImageFetchError(f"Timed out after {self.settings.fetch_timeout:.0f} s: {_short(url)}") from e
        except requests.RequestException as e:
            raise ImageFetchError(f"Could not download {_short(url)}: {e}") from e

    def _check(self, url: str) -> bool:
        """Refuse URLs outside the rules; return True when the URL is on Label Studio."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageFetchError(
                f"Refused image URL scheme '{parts.scheme or '(none)'}:' ({_short(url)}): only http(s) "
                "URLs, Label Studio paths and data: URIs are fetched. Cloud storage URIs "
                "(s3://, gs://, azure-blob://) need Label Studio's presigned URLs."
            )
        if self.ls_origin and _origin(url) == self.ls_origin:
            return True
        host = (parts.hostname or "").lower()
        if not host:
            raise ImageFetchError(f"The image URL has no host: {_short(url)}")
        if not any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.settings.allowed_hosts):
            raise ImageFetchError(
                f"Refused image host '{host}': it is neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS "
                "(a comma-separated list; '*.example.com' and '*' work)."
            )
        if not self.settings.allow_internal_hosts:
            _refuse_internal(host, parts.port or (443 if parts.scheme == "https" else 80))
        return False

    def _read(self, response: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.settings.max_image_bytes
        with response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageFetchError(f"The image is {int(declared):,} bytes, over MAX_IMAGE_BYTES={limit:,}.")
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in response.iter_content(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise ImageFetchError(f"The image is over MAX_IMAGE_BYTES={limit:,} bytes.")
                    if time.monotonic() > deadline:
                        raise ImageFetchError(
                            f"Download took longer than FETCH_TIMEOUT={self.settings.fetch_timeout:.0f} s."
                        )
                    chunks.append(chunk)
            except requests.RequestException as e:
                raise ImageFetchError(f"The download of {_short(url)} broke off: {e}") from e
        return b"".join(chunks)

    def _data_uri(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageFetchError("Only base64 data: URIs are supported for images.")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise ImageFetchError(f"The data: URI is over MAX_IMAGE_BYTES={self.settings.max_image_bytes:,}.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageFetchError(f"The data: URI is not valid base64: {e}") from e


def _refuse_internal(host: str, port: int) -> None:
    """Refuse hosts that resolve to any non-public address (checked for every address)."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageFetchError(f"Cannot resolve image host '{host}': {e}") from e
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise ImageFetchError(
                f"Refused image host '{host}': it resolves to the internal address {address}. "
                "Set ALLOW_INTERNAL_HOSTS=true only if the worker may reach your private network."
            )


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def _short(url: str) -> str:
    """URLs in messages lose their query (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200] if parts.scheme else url[:80]


def _json_or_empty(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _jwt_expiry(token: str) -> float:
    """The ``exp`` claim of a JWT (not verified: Label Studio checks it), or 4 minutes from now."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return time.time() + 240
