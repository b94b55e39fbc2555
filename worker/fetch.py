"""Download task images without becoming an SSRF proxy or handing the API key to anyone.

Task data is untrusted: anyone who can import a task chooses its image URL. The rules:

* **One parse.** A URL is parsed once, by urllib3 (the library that connects), and refused when
  it holds a backslash, whitespace, a control character, userinfo (``user@``), a zone id or an
  IPv4 address in a non-standard form (``2130706433``, ``0x7f.1``); the request then goes to the
  host, port and path of that parse, never to a string parsed again by someone else.
* **The key goes to Label Studio's data, only.** ``Authorization`` is sent only to the exact
  origin (scheme, host, port) of ``LABEL_STUDIO_URL``, only on the paths that serve task data
  (uploads, local files, storage resolve/presign), and only while every hop so far was on Label
  Studio: a foreign URL that redirects into Label Studio gets no key. Other Label Studio paths
  are refused.
* **Cloud storage** URIs (``s3://``, ``gs://``, ``azure-blob://``) go to Label Studio's storage
  resolver for their own task (``/tasks/<id>/resolve/?fileuri=<base64>``), which streams the
  object or redirects to a presigned URL; such a redirect may go to ``STORAGE_HOSTS`` too. A task
  may name the resolver for its own id only (the key reads every project's storage).
* **Other hosts** only when ``ALLOWED_HOSTS`` names them (``*`` for any public host), and never
  when they resolve to a loopback, private, link-local, reserved or multicast address unless
  ``ALLOW_INTERNAL_HOSTS`` is set (and, for a storage host, named exactly: anyone can name a host
  under ``*.amazonaws.com``); IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4,
  Teredo) and the unspecified address are always refused.
* **Connect to the address that was checked.** The host is resolved once per hop; the connection
  goes to the vetted IP, with the original ``Host`` header and TLS server name (DNS rebinding
  cannot swap the address between check and connect).
* ``data:`` URIs are decoded in memory; ``file://`` and every other scheme is refused; every
  redirect hop goes through all of the above again; refused or reset connections and 429/5xx
  answers are asked again (``FETCH_RETRIES``, exponential backoff) within the deadline;
  responses are asked for without content encoding; size is capped, and time too, for the
  whole download (name lookup, headers, redirects and body), not per socket read.
* Messages never carry a URL's query string or userinfo (presigned URLs hold credentials there).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import unquote, urljoin

import certifi
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    HTTPError,
    InsecureRequestWarning,
    LocationParseError,
    NewConnectionError,
    ProtocolError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import Url, parse_url

from common.errors import ImageFetchError
from common.labelstudio.client import LabelStudioAuth
from common.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
#: Answers worth asking again (the server is busy or restarting); so are refused or reset connections.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Seconds before the first retry; doubled for each one after, never past FETCH_TIMEOUT.
RETRY_BACKOFF = 0.5
_CHUNK = 256 * 1024
#: Connection pools kept open (one per address and host), least recently used closed first.
_POOLS = 64

#: Label Studio paths that serve task data: uploads, local storage, storage resolve / presign.
LABEL_STUDIO_DATA_PATH = re.compile(
    r"/(?:data/upload/|data/local-files/|storage-data/uploaded/|(?:tasks|projects)/\d+/(?:resolve|presign)/)"
)
#: Label Studio's storage resolvers: they stream an object from cloud storage, or redirect to it.
LABEL_STUDIO_RESOLVE_PATH = re.compile(r"/(tasks|projects)/(\d+)/(?:resolve|presign)/")
#: URI schemes of Label Studio's cloud storages (S3 and S3-compatible, GCS, Azure Blob).
STORAGE_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
#: The longest storage URI resolved (Label Studio takes it base64-encoded in a query string).
MAX_STORAGE_URI = 2048
#: IPv6 ranges that carry an IPv4 address: a way to reach an internal IPv4 host by an IPv6 name.
_EMBEDDED_IPV4 = tuple(
    ipaddress.ip_network(n)
    for n in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32")
)
_FORBIDDEN_CHARACTERS = re.compile(r"[\\\s\x00-\x1f\x7f]")

#: ``host, port -> addresses``: the system resolver, or another for tests.
Resolver = Callable[[str, int], list[str]]
#: Name lookups of image hosts run here, so a slow resolver costs the fetch its deadline, not a
#: hung thread. (Label Studio's own host is looked up directly: names an attacker controls
#: that stall the resolver must not starve it.)
_LOOKUPS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="prelabel-dns")
#: The deadline of the download running on each thread, for the connections it uses.
_current = threading.local()


class TransientFetchError(ImageFetchError):
    """A failure that asking again may fix: a refused or reset connection, a 429 or 5xx answer."""


def _task_number(task_id: object) -> int | None:
    """A Label Studio task id as an integer (ids arrive as ints, or digits from older payloads)."""
    if type(task_id) is int and task_id > 0:
        return task_id
    if isinstance(task_id, str) and task_id.isascii() and task_id.isdigit() and len(task_id) < 19:
        return int(task_id) or None
    return None


def is_storage_uri(raw: str) -> bool:
    """``s3://...``, ``gs://...``, ``azure-blob://...``: an object in a Label Studio cloud storage."""
    return raw.split("://", 1)[0].lower() in STORAGE_SCHEMES if "://" in raw else False


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_strict(raw: str) -> Url:
    """Parse an absolute http(s) URL the way it will be requested, refusing every ambiguous form.

    Raises:
        ImageFetchError: the reason, with the URL shown without query or userinfo.
    """
    if _FORBIDDEN_CHARACTERS.search(raw):
        raise ImageFetchError(
            f"Refused an image URL with a backslash, whitespace or control character in it ({describe(raw)}): "
            "percent-encode such characters."
        )
    try:
        url = parse_url(raw)
    except LocationParseError as e:
        raise ImageFetchError(f"Unreadable image URL: {describe(raw)}") from e
    if url.scheme not in ("http", "https"):
        raise ImageFetchError(
            f"Refused image URL scheme '{url.scheme or '(none)'}:' ({describe(raw)}): only http(s) URLs, Label "
            "Studio paths, data: URIs and cloud storage URIs (s3://, gs://, azure-blob://) are fetched."
        )
    authority = re.split(r"[/?#]", raw.split("//", 1)[-1], maxsplit=1)[0]
    if url.auth is not None or "@" in authority:
        raise ImageFetchError(f"Refused an image URL with a user name or password in it: {describe(raw)}")
    if not url.host:
        raise ImageFetchError(f"The image URL has no host: {describe(raw)}")
    if "%" in url.host:
        raise ImageFetchError(f"Refused an image URL with an IPv6 zone id: {describe(raw)}")
    if url.port == 0:
        raise ImageFetchError(f"Refused an image URL with port 0: {describe(raw)}")
    if not url.host.startswith("[") and _is_loose_ipv4(url.host):
        raise ImageFetchError(
            f"Refused image host '{url.host}': write an IPv4 address as four decimal numbers (a.b.c.d)."
        )
    return url


def _is_loose_ipv4(host: str) -> bool:
    """True for IPv4 spellings the C resolver accepts but a.b.c.d is not (decimal, octal, hex, short)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def address_refusal(address: str, allow_internal: bool) -> str | None:
    """Why the worker must not connect to ``address`` (the end of a sentence), or None when it may."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.is_unspecified or ip.is_multicast:
        return f"the {'unspecified' if ip.is_unspecified else 'multicast'} address {ip}, which is never fetched"
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _EMBEDDED_IPV4) and not ip.is_loopback:
        return f"{ip}, an IPv6 form of an IPv4 address (mapped, NAT64, 6to4 or Teredo), which is never fetched"
    if allow_internal:
        return None
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local  # fec0::/10, not private to 3.11
    if not ip.is_global or ip.is_reserved or ip.is_private or ip.is_loopback or ip.is_link_local or site_local:
        return (
            f"the internal address {ip}. Set ALLOW_INTERNAL_HOSTS=true only if the worker may reach your "
            "private network"
        )
    return None


def describe(raw: str) -> str:
    """``raw`` fit for a message or a log: no query string, fragment or userinfo, at most 200 chars."""
    cut = re.split(r"[?#]", raw, maxsplit=1)[0]
    cut = re.sub(r"//[^/]*@", "//***@", cut)
    return repr(cut[:200])


def short(url: Url) -> str:
    """A parsed URL for messages: scheme, host, port and path; never the query (presigned
    signatures) or userinfo."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path or ''}"[:200]


def _default_port(url: Url) -> int:
    return 443 if url.scheme == "https" else 80


def _port(url: Url) -> int:
    return url.port or _default_port(url)


def _origin(url: Url) -> tuple[str, str, int]:
    return url.scheme or "", url.host or "", _port(url)


def _ip_literal(host: str) -> str | None:
    """``host`` when it is an IP address (no lookup needed), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class Deadline:
    """One download (name lookups, headers, redirects, body) within FETCH_TIMEOUT. urllib3's
    timeouts bound each socket read, so a server that sends its headers or its body a byte at a
    time could hold a fetch thread for as long as it liked; at the deadline this shuts the socket
    the download is using, whatever the thread is waiting for."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return max(0.05, self.at - time.monotonic())

    def watch(self, sock: socket.socket | None) -> None:
        """``sock`` now carries this download (None: the connection goes back to its pool)."""
        with self._lock:
            self._socket = sock
            if sock is not None and self.expired:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()
        self.watch(None)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._socket is not None:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: wakes a blocked read


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[Deadline]:
    """A deadline for this thread's connections; an outer one (a download that needed a token
    refresh) is back in force afterwards."""
    outer = getattr(_current, "deadline", None)
    deadline = Deadline(seconds)
    _current.deadline = deadline
    try:
        yield deadline
    finally:
        _current.deadline = outer
        deadline.cancel()


class _Watched:
    """A connection that hands its socket to the current download's deadline once its request is sent."""

    def request(self, *args, **kwargs) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        deadline = getattr(_current, "deadline", None)
        if deadline is not None:
            deadline.watch(self.sock)  # type: ignore[attr-defined]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


@dataclass(frozen=True)
class Target:
    """One checked request: what is sent, to which address, and whether it carries the key."""

    url: Url
    address: str
    with_key: bool
    on_label_studio: bool


class Connector:
    """HTTP(S) to a vetted address, keeping the URL's host in ``Host`` and in TLS (SNI and
    certificate check). Pools are kept per (address, host) so Label Studio downloads reuse
    their connections."""

    def __init__(self, threads: int, ca_certs: str | None = None, verify: bool = True) -> None:
        self._threads = threads
        self._ca_certs = ca_certs or certifi.where()
        self._verify = verify
        self._pools: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def request(
        self, method: str, url: Url, address: str, headers: dict[str, str], timeout: float, body: bytes | None = None
    ) -> urllib3.BaseHTTPResponse:
        host, port = url.host or "", _port(url)
        headers = {"Host": host if port == _default_port(url) else f"{host}:{port}", **headers}
        pool = self._pool(url.scheme or "http", address, port, host.strip("[]"))
        return pool.urlopen(
            method, url.request_uri, body=body, headers=headers, redirect=False, retries=False,
            preload_content=False, decode_content=True, assert_same_host=False,
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
        )  # fmt: skip

    def _pool(self, scheme: str, address: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, address, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    address, port, maxsize=self._threads, server_hostname=host,
                    assert_hostname=host if self._verify else False,
                    cert_reqs="CERT_REQUIRED" if self._verify else "CERT_NONE", ca_certs=self._ca_certs,
                )  # fmt: skip
                pool.ConnectionCls = _WatchedHTTPSConnection
            else:
                pool = urllib3.HTTPConnectionPool(address, port, maxsize=self._threads)
                pool.ConnectionCls = _WatchedHTTPConnection
            self._pools[key] = pool
            while len(self._pools) > _POOLS:
                self._pools.popitem(last=False)[1].close()
            return pool


class ImageFetcher:
    """Fetch image bytes for a task, by the rules in this module's docstring."""

    def __init__(self, settings: Settings, resolver: Resolver = system_resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        if not settings.verify_ssl:
            log.warning("VERIFY_SSL=false: image downloads do not check HTTPS certificates")
            urllib3.disable_warnings(InsecureRequestWarning)  # said once above, not once per download
        self.connector = Connector(settings.fetch_threads or 8, settings.ca_bundle, settings.verify_ssl)
        self.allowed_hosts = tuple(pattern.lower().rstrip(".") for pattern in settings.allowed_hosts)
        self.storage_hosts = tuple(pattern.lower().rstrip(".") for pattern in settings.storage_hosts)
        self.ls_url = parse_url(settings.label_studio_url.rstrip("/")) if settings.label_studio_url else None
        key = settings.label_studio_api_key
        self.ls_auth = LabelStudioAuth(key, self.post_to_label_studio) if self.ls_url else None

    def fetch(self, raw: str, task_id: object = None) -> bytes:
        """Return the bytes behind ``raw``, the image value of task ``task_id`` (which a cloud
        storage URI needs). Raises ImageFetchError with the reason."""
        if not isinstance(raw, str) or not raw:
            raise ImageFetchError("The task's image value is not a URL.")
        if raw.startswith("data:"):
            return self._data_uri(raw)
        url = self._absolute(self._storage_resolver(raw, task_id) if is_storage_uri(raw) else raw)
        self._check_resolver_is_the_tasks(url, task_id)
        with _deadline(self.settings.fetch_timeout) as deadline:
            chain_on_label_studio = True  # every hop so far was on Label Studio
            from_resolver = False  # this hop is a redirect from Label Studio's storage resolver
            for _ in range(MAX_REDIRECTS + 1):
                target = self._check(url, chain_on_label_studio, deadline, from_resolver)
                response = self._get_retrying(target, deadline)
                if response.status not in REDIRECT_STATUSES:
                    return self._read(response, target, deadline)
                location = response.headers.get("Location", "")
                _discard(response, deadline)
                if not location:
                    raise ImageFetchError(f"A redirect without a Location header: {short(target.url)}")
                from_resolver = target.on_label_studio and self._is_resolver(target.url)
                chain_on_label_studio = chain_on_label_studio and target.on_label_studio
                try:
                    joined = urljoin(target.url.url, location)
                except ValueError as e:
                    raise ImageFetchError(f"Unreadable redirect from {short(target.url)}: {describe(location)}") from e
                url = parse_strict(joined)
        raise ImageFetchError(f"Too many redirects (more than {MAX_REDIRECTS}) for the image URL.")

    def post_to_label_studio(self, path: str, payload: dict) -> tuple[int, object]:
        """POST JSON to ``LABEL_STUDIO_URL`` + ``path`` (the token refresh); returns (status, JSON or None)."""
        assert self.ls_url is not None
        url = parse_url(self.ls_url.url + path)
        body = json.dumps(payload).encode()
        with _deadline(self.settings.fetch_timeout) as deadline:
            address = self._resolve_label_studio(url)
            try:
                response = self.connector.request(
                    "POST", url, address, {"Content-Type": "application/json"}, deadline.left(), body
                )
                data = response.read(1 << 20)
                response.close()
            except HTTPError as e:
                raise ImageFetchError(f"Could not reach Label Studio at {short(self.ls_url)}: {_reason(e)}") from e
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, None

    def _storage_resolver(self, uri: str, task_id: object) -> str:
        """Label Studio's path that serves ``uri`` (``s3://bucket/key`` and the like) for the task:
        Label Studio holds the storage's credentials and either streams the object or redirects
        to a presigned URL, as for its own editor. prelabel needs no cloud credentials."""
        scheme = uri.split(":", 1)[0]
        if self.ls_url is None:
            raise ImageFetchError(
                f"Cloud storage URI ({scheme}://) without LABEL_STUDIO_URL: prelabel downloads such images "
                "through Label Studio, which holds the storage's credentials. Set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY."
            )
        if len(uri) > MAX_STORAGE_URI:
            raise ImageFetchError(f"Cloud storage URI of {len(uri):,} characters, over {MAX_STORAGE_URI:,}.")
        number = _task_number(task_id)
        if number is None:
            raise ImageFetchError(
                f"Cloud storage URI ({scheme}://) without its Label Studio task id: Label Studio resolves it per task."
            )
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"/tasks/{number}/resolve/?fileuri={encoded}"

    def _is_resolver(self, url: Url) -> bool:
        return self._resolver_path(url) is not None

    def _resolver_path(self, url: Url) -> re.Match | None:
        """The match of ``url``'s path against Label Studio's storage resolvers (on its origin)."""
        if self.ls_url is None or _origin(url) != _origin(self.ls_url):
            return None
        base = (self.ls_url.path or "").rstrip("/")
        return LABEL_STUDIO_RESOLVE_PATH.match((url.path or "")[len(base) :])  # a prefix, as the key's paths are

    def _check_resolver_is_the_tasks(self, url: Url, task_id: object) -> None:
        """A task's image may name Label Studio's storage resolver only for that task: the API
        key can read every project's storage, so one task must not borrow another's images."""
        match = self._resolver_path(url)
        if match is None:
            return
        owner, number = match.group(1), int(match.group(2))
        if owner != "tasks" or number != _task_number(task_id):
            raise ImageFetchError(
                f"Refused Label Studio's storage resolver for {owner} {number} in the data of task {task_id!r:.20}: "
                "a task's image may be resolved only for that task."
            )

    def _absolute(self, raw: str) -> Url:
        """A Label Studio path becomes a URL on LABEL_STUDIO_URL; anything else must be absolute."""
        if raw.startswith("/") and not raw.startswith("//"):
            if self.ls_url is None:
                raise ImageFetchError(
                    f"The image is a path on Label Studio ({describe(raw)}), but LABEL_STUDIO_URL is not set: "
                    "set it (and LABEL_STUDIO_API_KEY) so the worker can download it."
                )
            raw = self.ls_url.url + raw
        return parse_strict(raw)

    def _check(self, url: Url, chain_on_label_studio: bool, deadline: Deadline, from_resolver: bool = False) -> Target:
        """Refuse ``url`` outside the rules; otherwise say where it goes and whether with the key.
        A redirect from Label Studio's storage resolver may also go to STORAGE_HOSTS."""
        if self.ls_url is not None and _origin(url) == _origin(self.ls_url):
            base = (self.ls_url.path or "").rstrip("/")
            path = url.path or "/"
            if ".." in unquote(url.request_uri):
                raise ImageFetchError(f"Refused a Label Studio URL with '..' in it: {short(url)}")
            if not path.startswith(base + "/") or not LABEL_STUDIO_DATA_PATH.match(path[len(base) :]):
                raise ImageFetchError(
                    f"Refused a Label Studio URL outside the paths that serve task data ({short(url)}): "
                    "uploads, local files and storage resolve/presign are fetched."
                )
            address = self._resolve_label_studio(url)
            return Target(url, address, with_key=chain_on_label_studio, on_label_studio=True)
        host = (url.host or "").strip("[]").rstrip(".")
        allowed = self.allowed_hosts + (self.storage_hosts if from_resolver else ())
        if not any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed):
            if from_resolver:
                raise ImageFetchError(
                    f"Refused storage host '{host}': Label Studio's storage resolver redirected there (a presigned "
                    "URL), but it is in neither STORAGE_HOSTS nor ALLOWED_HOSTS. Add it to STORAGE_HOSTS (an "
                    "S3-compatible server such as MinIO), or turn presigned URLs off on the storage."
                )
            raise ImageFetchError(
                f"Refused image host '{host}': it is neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS "
                "(a comma-separated list; '*.example.com' and '*' work)."
            )
        # A storage host reached by a wildcard of STORAGE_HOSTS alone (anyone can name a host under
        # *.amazonaws.com) stays on public addresses even with ALLOW_INTERNAL_HOSTS: a MinIO on the
        # private network is named exactly.
        wildcard_only = (
            not any(fnmatch.fnmatchcase(host, p) for p in self.allowed_hosts) and host not in self.storage_hosts
        )
        allow_internal = self.settings.allow_internal_hosts and not wildcard_only
        addresses = self._resolve_all(url, deadline)
        for address in addresses:
            reason = address_refusal(address, allow_internal)
            if reason:
                raise ImageFetchError(f"Refused image host '{host}': it resolves to {reason}.")
        return Target(url, addresses[0], with_key=False, on_label_studio=False)

    def _resolve_label_studio(self, url: Url) -> str:
        host = (url.host or "").strip("[]")
        if literal := _ip_literal(host):
            return literal
        try:
            return self.resolver(host, _port(url))[0]
        except (OSError, UnicodeError, IndexError) as e:
            raise ImageFetchError(f"Cannot resolve Label Studio's host '{host}': {_reason(e)}") from e

    def _resolve_all(self, url: Url, deadline: Deadline) -> list[str]:
        host = (url.host or "").strip("[]")
        if literal := _ip_literal(host):
            return [literal]
        lookup = _LOOKUPS.submit(self.resolver, host, _port(url))
        try:
            addresses = lookup.result(timeout=deadline.left())
        except FutureTimeout as e:
            raise ImageFetchError(f"Timed out after {self.settings.fetch_timeout:.0f} s resolving '{host}'.") from e
        except (OSError, UnicodeError) as e:
            raise ImageFetchError(f"Cannot resolve image host '{host}': {_reason(e)}") from e
        if not addresses:
            raise ImageFetchError(f"Cannot resolve image host '{host}': no address.")
        return addresses

    def _get_retrying(self, target: Target, deadline: Deadline) -> urllib3.BaseHTTPResponse:
        """``_get``, asked again FETCH_RETRIES times after a transient failure, with exponential
        backoff, while FETCH_TIMEOUT leaves time for it."""
        retries = self.settings.fetch_retries
        for attempt in range(retries + 1):
            try:
                return self._get(target, deadline)
            except TransientFetchError as e:
                pause = RETRY_BACKOFF * 2**attempt
                if attempt == retries or deadline.at - time.monotonic() < pause + 0.5:
                    raise
                log.info("%s; retry %d of %d in %.1f s", e, attempt + 1, retries, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _get(self, target: Target, deadline: Deadline) -> urllib3.BaseHTTPResponse:
        auth = self.ls_auth if target.with_key else None
        response = self._request(target, auth.headers() if auth else {}, deadline)
        if response.status == 401 and auth and auth.uses_pat:
            _discard(response, deadline)
            auth.invalidate()
            response = self._request(target, auth.headers(), deadline)
        if response.status in (401, 403) and target.on_label_studio:
            _discard(response, deadline)
            if not target.with_key:
                raise ImageFetchError(
                    f"Label Studio refused the image download (HTTP {response.status}): it was reached through a "
                    "redirect from another host, which never gets the API key."
                )
            raise ImageFetchError(
                f"Label Studio refused the image download (HTTP {response.status}): check "
                "LABEL_STUDIO_API_KEY. A legacy token only works when legacy tokens are enabled for the "
                "organisation; a personal access token works as is."
            )
        if response.status == 404 and target.on_label_studio and self._is_resolver(target.url):
            _discard(response, deadline)
            raise ImageFetchError(
                "Label Studio could not resolve the task's cloud storage URI (HTTP 404): the project has no source "
                "storage for its bucket or container, or the object is gone."
            )
        if response.status >= 400:
            _discard(response, deadline)
            error = TransientFetchError if response.status in RETRY_STATUSES else ImageFetchError
            raise error(f"The image URL answered HTTP {response.status}: {short(target.url)}")
        return response

    def _request(self, target: Target, headers: dict[str, str], deadline: Deadline) -> urllib3.BaseHTTPResponse:
        headers = {"Accept-Encoding": "identity", "User-Agent": "prelabel", **headers}
        try:
            return self.connector.request("GET", target.url, target.address, headers, deadline.left())
        except NewConnectionError as e:  # a subclass of urllib3's timeout error, for history's sake
            raise TransientFetchError(f"Could not connect to {short(target.url)}: {_reason(e)}") from e
        except SSLError as e:
            raise ImageFetchError(
                f"Could not download {short(target.url)}: its HTTPS certificate was not accepted ({_reason(e)}). "
                "Behind an internal CA, set REQUESTS_CA_BUNDLE to the PEM file of its certificates."
            ) from e
        except (Urllib3Timeout, HTTPError) as e:
            if deadline.expired or isinstance(e, Urllib3Timeout):
                raise self._too_slow(target) from e
            error = TransientFetchError if isinstance(e, ProtocolError) else ImageFetchError  # reset, closed
            raise error(f"Could not download {short(target.url)}: {_reason(e)}") from e

    def _read(self, response: urllib3.BaseHTTPResponse, target: Target, deadline: Deadline) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            _discard(response, deadline)
            raise ImageFetchError(f"The image announces {declared[:20]} bytes, over MAX_IMAGE_BYTES={limit:,}.")
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := response.read1(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageFetchError(f"The image is over MAX_IMAGE_BYTES={limit:,} bytes.")
                chunks.append(chunk)
            if deadline.expired:  # the socket was shut under the read
                raise self._too_slow(target)
        except ImageFetchError:
            _discard(response, deadline)
            raise
        except (HTTPError, OSError) as e:
            _discard(response, deadline)
            if deadline.expired:
                raise self._too_slow(target) from e
            raise ImageFetchError(f"The download of {short(target.url)} broke off: {_reason(e)}") from e
        deadline.watch(None)  # before the connection goes back to its pool
        response.release_conn()
        return b"".join(chunks)

    def _too_slow(self, target: Target) -> ImageFetchError:
        return ImageFetchError(
            f"Timed out after {self.settings.fetch_timeout:.0f} s (FETCH_TIMEOUT): {short(target.url)}"
        )

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


def _discard(response: urllib3.BaseHTTPResponse, deadline: Deadline) -> None:
    """Close a response we will not read (its connection is not reused mid-body)."""
    deadline.watch(None)
    response.close()
    response.release_conn()


def _reason(error: BaseException) -> str:
    """An error's cause without the URL urllib3 writes into its messages (it may hold a query)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        if isinstance(seen, socket.gaierror | UnicodeError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__
