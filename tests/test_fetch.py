"""Image fetching: Label Studio auth (legacy token and PAT), and every refusal rule, each tried
against real loopback servers that record what reaches them."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from common.errors import ImageFetchError
from common.labelstudio.client import describe_failure, is_personal_access_token, label_studio_client
from tests.lsfake import FakeLabelStudio, trickle, trickle_headers
from worker.fetch import RETRY_BACKOFF, ImageFetcher, address_refusal, parse_strict

PHOTO = "2011_000003.jpg"


@pytest.fixture
def fetcher_for(make_settings, label_studio):
    def build(api_key=None, resolver=None, **overrides) -> ImageFetcher:
        overrides.setdefault("label_studio_url", label_studio.url)
        settings = make_settings(label_studio_api_key=api_key, **overrides)
        return ImageFetcher(settings, **({"resolver": resolver} if resolver else {}))

    return build


@pytest.fixture
def attacker(photos):
    """Another host, which must never see the API key: it records every request it gets."""
    server = FakeLabelStudio(dict(photos)).start()
    yield server
    server.stop()


def no_key_reached(server: FakeLabelStudio) -> bool:
    return all(auth is None for _, auth in server.requests)


def test_relative_upload_path_uses_the_legacy_token(fetcher_for, label_studio, photos):
    data = fetcher_for(label_studio.legacy_token).fetch(label_studio.upload_path(PHOTO))
    assert data == photos[PHOTO]
    assert label_studio.requests[-1] == (f"/data/upload/1/{PHOTO}", f"Token {label_studio.legacy_token}")
    headers = label_studio.headers[-1]
    assert headers["Host"] == f"localhost:{label_studio.port}"  # the name, though the address was pinned
    assert headers["Accept-Encoding"] == "identity"


def test_absolute_url_on_label_studio_gets_the_token_too(fetcher_for, label_studio, photos):
    fetcher = fetcher_for(label_studio.legacy_token)
    assert fetcher.fetch(label_studio.url + label_studio.upload_path(PHOTO)) == photos[PHOTO]


def test_personal_access_token_is_exchanged_reused_and_refreshed(fetcher_for, label_studio, photos):
    assert is_personal_access_token(label_studio.pat) and not is_personal_access_token(label_studio.legacy_token)
    fetcher = fetcher_for(label_studio.pat)
    path = label_studio.upload_path(PHOTO)
    assert fetcher.fetch(path) == photos[PHOTO]
    assert fetcher.fetch(path) == photos[PHOTO]
    assert label_studio.refreshes == 1  # the access token is reused while valid
    auth = label_studio.requests[-1][1]
    assert auth.startswith("Bearer ") and auth != f"Bearer {label_studio.pat}"  # never the PAT itself

    label_studio.expire_access_tokens()  # Label Studio now answers 401 to the old access token
    assert fetcher.fetch(path) == photos[PHOTO]
    assert label_studio.refreshes == 2


def test_wrong_legacy_token_says_what_to_check(fetcher_for, label_studio):
    with pytest.raises(ImageFetchError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        fetcher_for("0" * 40).fetch(label_studio.upload_path(PHOTO))


def test_revoked_personal_access_token_says_so(fetcher_for, label_studio):
    from tests.lsfake import make_jwt

    with pytest.raises(ImageFetchError, match="refused the personal access token"):
        fetcher_for(make_jwt({"token_type": "refresh"})).fetch(label_studio.upload_path(PHOTO))


def test_label_studio_path_without_label_studio_url(make_settings):
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL is not set"):
        ImageFetcher(make_settings()).fetch("/data/upload/1/x.jpg")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme 'file:'"),
        ("ftp://example.com/a.jpg", "scheme 'ftp:'"),
        ("s3://bucket/a.jpg", "Cloud storage"),
        ("//images.example.com/a.jpg", "scheme '\\(none\\):'"),
        ("/data/local-files/?d=../../etc/passwd", "'\\.\\.'"),
        ("/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", "'\\.\\.'"),
        ("/api/projects/", "outside the paths that serve task data"),
        ("/api/current-user/token", "outside the paths that serve task data"),
        ("/static/images/logo.png", "outside the paths that serve task data"),
        ("http://images.example.com/a.jpg", "neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS"),
    ],
)
def test_refused_urls(fetcher_for, label_studio, url, message):
    with pytest.raises(ImageFetchError, match=message):
        fetcher_for("t" * 40).fetch(url)
    assert label_studio.requests == []  # refused before any connection


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{attacker}\\@localhost:{ls}/data/upload/1/x.png",  # urlsplit and urllib3 disagree
        "http://127.0.0.1:{attacker}\\\\@localhost:{ls}/data/upload/1/x.png",
        "http://localhost:{ls}\\/data/upload/1/x.png",
        "http://localhost:{ls}/data/upload/1/x.png\n",
        "http://localhost:{ls}/data/upload/1/x.png\r\nX-Injected: 1",
        " http://localhost:{ls}/data/upload/1/x.png",
        "http://localhost:{ls}/data/upload/1/x\tpng",
        "http://localhost:{ls}/data/upload/1/\x00x.png",
    ],
)
def test_backslash_whitespace_and_control_characters_are_refused(fetcher_for, label_studio, attacker, template):
    """The reported attack: Label Studio's host after a backslash, the attacker's before it."""
    url = template.format(attacker=attacker.port, ls=label_studio.port)
    for fetcher in (
        fetcher_for(label_studio.legacy_token),
        fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True),
    ):
        with pytest.raises(ImageFetchError, match="backslash, whitespace or control character"):
            fetcher.fetch(url)
    assert attacker.requests == [] and label_studio.requests == []


def test_userinfo_is_refused_and_never_shown(fetcher_for, label_studio):
    url = f"http://admin:hunter2@localhost:{label_studio.port}/data/upload/1/{PHOTO}"
    with pytest.raises(ImageFetchError, match="user name or password") as refused:
        fetcher_for(label_studio.legacy_token).fetch(url)
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ImageFetchError, match="user name or password"):
        fetcher_for(label_studio.legacy_token).fetch(f"http://@localhost:{label_studio.port}/data/upload/1/{PHOTO}")
    assert label_studio.requests == []


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1", "017700000001", "127.0.1"]
)
def test_non_standard_ipv4_forms_are_refused(fetcher_for, host):
    fetcher = fetcher_for(allowed_hosts=("*",), allow_internal_hosts=True)
    with pytest.raises(ImageFetchError, match="four decimal numbers"):
        fetcher.fetch(f"http://{host}/a.jpg")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://127.0.0.1:6379/",  # loopback under another name than LABEL_STUDIO_URL's
        "http://10.1.2.3/a.jpg",
        "http://192.168.0.10/a.jpg",
        "http://172.16.5.4/a.jpg",
        "http://100.64.0.1/a.jpg",  # carrier-grade NAT
        "http://[::1]/a.jpg",
        "http://[fd00::1]/a.jpg",  # unique local
        "http://[fe80::1]/a.jpg",
        "http://[fec0::1]/a.jpg",  # site-local, which Python 3.11 calls global
    ],
)
def test_internal_addresses_are_refused_even_when_every_host_is_allowed(fetcher_for, url):
    with pytest.raises(ImageFetchError, match="internal address"):
        fetcher_for(allowed_hosts=("*",)).fetch(url)


@pytest.mark.parametrize(
    "address",
    [
        "::ffff:127.0.0.1",  # IPv4-mapped
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "::7f00:1",  # IPv4-compatible
        "0.0.0.0",
        "::",
        "224.0.0.1",
    ],
)
def test_ipv4_in_ipv6_and_unspecified_addresses_are_always_refused(fetcher_for, address):
    """As literals and as what a name resolves to, even with ALLOW_INTERNAL_HOSTS."""
    fetcher = fetcher_for(allowed_hosts=("*",), allow_internal_hosts=True, resolver=lambda host, port: [address])
    literal = f"[{address}]" if ":" in address else address
    for url in (f"http://{literal}/a.jpg", "http://images.example.com/a.jpg"):
        with pytest.raises(ImageFetchError, match="never fetched"):
            fetcher.fetch(url)
    assert address_refusal(address, allow_internal=True) is not None


def test_a_name_resolving_to_any_internal_address_is_refused(fetcher_for):
    resolver = lambda host, port: ["93.184.216.34", "10.0.0.7"]  # noqa: E731
    with pytest.raises(ImageFetchError, match="internal address 10.0.0.7"):
        fetcher_for(allowed_hosts=("*",), resolver=resolver).fetch("http://images.example.com/a.jpg")


def test_zone_ids_are_refused(fetcher_for):
    with pytest.raises(ImageFetchError, match="zone id"):
        fetcher_for(allowed_hosts=("*",), allow_internal_hosts=True).fetch("http://[fe80::1%25eth0]/a.jpg")


def test_the_connection_goes_to_the_address_that_was_checked(fetcher_for, attacker, photos):
    """DNS rebinding: a second lookup would answer 127.0.0.2, where nothing listens. One lookup
    per fetch, and the connection to its answer, keeping the name in Host."""
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    asked = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    fetcher = fetcher_for(allowed_hosts=("images.test",), allow_internal_hosts=True, resolver=resolver)
    assert fetcher.fetch(f"http://images.test:{attacker.port}/raw/{PHOTO}") == photos[PHOTO]
    assert asked == ["images.test"]
    assert attacker.headers[-1]["Host"] == f"images.test:{attacker.port}"


def test_key_never_reaches_another_host_than_label_studio(fetcher_for, label_studio, attacker, photos):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    # Label Studio's own port under another name, a foreign server, a redirect out of Label Studio
    with pytest.raises(ImageFetchError, match="HTTP 401"):
        fetcher.fetch(f"http://127.0.0.1:{label_studio.port}/data/upload/1/{PHOTO}")
    assert fetcher.fetch(f"http://127.0.0.1:{attacker.port}/raw/{PHOTO}") == photos[PHOTO]
    assert fetcher.fetch(f"/tasks/1/resolve/?to=http://127.0.0.1:{attacker.port}/raw/{PHOTO}", 1) == photos[PHOTO]
    assert label_studio.requests[-1] == ("/tasks/1/resolve/", f"Token {label_studio.legacy_token}")
    assert attacker.requests and no_key_reached(attacker)
    assert label_studio.requests[0] == (f"/data/upload/1/{PHOTO}", None)


def test_a_foreign_redirect_into_label_studio_gets_no_key(fetcher_for, label_studio, attacker):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    bounce = f"http://127.0.0.1:{attacker.port}/redirect?to={label_studio.url}{label_studio.upload_path(PHOTO)}"
    with pytest.raises(ImageFetchError, match="redirect from another host, which never gets the API key"):
        fetcher.fetch(bounce)
    assert label_studio.requests == [(f"/data/upload/1/{PHOTO}", None)]


def test_once_a_hop_left_label_studio_no_later_hop_gets_the_key(fetcher_for, label_studio, attacker):
    """attacker -> Label Studio (a data path that redirects without auth) -> Label Studio's upload."""
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    inner = f"{label_studio.url}/data/upload/1/redirect?to={label_studio.upload_path(PHOTO)}"
    with pytest.raises(ImageFetchError, match="never gets the API key"):
        fetcher.fetch(f"http://127.0.0.1:{attacker.port}/redirect?to={quote(inner)}")
    assert [auth for _, auth in label_studio.requests] == [None, None]


def test_every_redirect_hop_is_checked(fetcher_for, label_studio, photos):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("*",))
    with pytest.raises(ImageFetchError, match="internal address 169.254.169.254"):
        fetcher.fetch("/tasks/1/resolve/?to=http://169.254.169.254/latest/meta-data/", 1)
    with pytest.raises(ImageFetchError, match="backslash"):
        fetcher.fetch("/tasks/1/resolve/?to=http://evil.example\\@localhost/data/upload/1/x.png", 1)
    with pytest.raises(ImageFetchError, match="outside the paths that serve task data"):
        fetcher.fetch("/tasks/1/resolve/?to=/api/projects/", 1)
    with pytest.raises(ImageFetchError, match="Unreadable redirect"):
        fetcher.fetch("/tasks/1/resolve/?to=http://[::1", 1)
    # a redirect that stays on Label Studio's data keeps working, with the token
    assert fetcher.fetch(f"/tasks/1/resolve/?to={label_studio.upload_path(PHOTO)}", 1) == photos[PHOTO]
    assert label_studio.requests[-1][1] == f"Token {label_studio.legacy_token}"


def test_cloud_storage_uris_are_streamed_by_label_studio_for_their_task(fetcher_for, label_studio, photos):
    label_studio.storage = {"s3://bucket/my photos/a.jpg": PHOTO, "gs://other/b.jpg": PHOTO}
    fetcher = fetcher_for(label_studio.legacy_token)
    assert fetcher.fetch("s3://bucket/my photos/a.jpg", 7) == photos[PHOTO]
    assert fetcher.fetch("gs://other/b.jpg", "8") == photos[PHOTO]
    assert [path for path, _ in label_studio.requests] == ["/tasks/7/resolve/", "/tasks/8/resolve/"]
    assert all(auth == f"Token {label_studio.legacy_token}" for _, auth in label_studio.requests)
    with pytest.raises(ImageFetchError, match="could not resolve the task's cloud storage URI"):
        fetcher.fetch("s3://bucket/missing.jpg", 7)  # no such object, or no storage for the bucket


def test_presigned_redirects_go_only_to_storage_hosts_and_never_get_the_key(fetcher_for, label_studio, attacker,
                                                                            photos):  # fmt: skip
    label_studio.storage = {"s3://bucket/a.jpg": PHOTO}
    label_studio.presign_to = f"http://127.0.0.1:{attacker.port}"  # the storage server
    with pytest.raises(ImageFetchError, match="Refused storage host '127.0.0.1'.*STORAGE_HOSTS"):
        fetcher_for(label_studio.legacy_token, allow_internal_hosts=True).fetch("s3://bucket/a.jpg", 1)
    storage = fetcher_for(label_studio.legacy_token, storage_hosts=("127.0.0.1",), allow_internal_hosts=True)
    assert storage.fetch("s3://bucket/a.jpg", 1) == photos[PHOTO]
    assert attacker.requests == [(f"/raw/{PHOTO}", None)]  # the presigned URL, without the API key
    with pytest.raises(ImageFetchError, match="internal address"):
        fetcher_for(label_studio.legacy_token, storage_hosts=("127.0.0.1",)).fetch("s3://bucket/a.jpg", 1)
    # STORAGE_HOSTS is for the storage resolver's redirects only
    bounce = f"http://localhost:{attacker.port}/redirect?to=http://127.0.0.1:{attacker.port}/raw/{PHOTO}"
    with pytest.raises(ImageFetchError, match="neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS"):
        fetcher_for(allowed_hosts=("localhost",), storage_hosts=("127.0.0.1",), allow_internal_hosts=True).fetch(bounce)


def test_a_task_may_use_the_storage_resolver_for_itself_only(fetcher_for, label_studio, photos):
    label_studio.storage = {"s3://bucket/a.jpg": PHOTO}
    fetcher = fetcher_for(label_studio.legacy_token)
    own = "/tasks/7/resolve/?fileuri=" + base64.urlsafe_b64encode(b"s3://bucket/a.jpg").decode()
    assert fetcher.fetch(own, 7) == photos[PHOTO]  # as Label Studio writes it for its editor
    longer = own.replace("/resolve/?", "/resolve/x?")  # the key goes to every path under the resolver's
    for borrowed, task_id in ((own, 8), (own.replace("/tasks/7/", "/projects/1/"), 7), (own, True), (own, None),
                              (longer, 8)):  # fmt: skip
        with pytest.raises(ImageFetchError, match="may be resolved only for that task"):
            fetcher.fetch(borrowed, task_id)
        with pytest.raises(ImageFetchError, match="may be resolved only for that task"):
            fetcher.fetch(label_studio.url + borrowed, task_id)
    assert len(label_studio.requests) == 1


def test_a_storage_host_matched_by_a_wildcard_alone_stays_public(fetcher_for, label_studio, photos, attacker):
    """Anyone can name a host under *.amazonaws.com that resolves to a private address: with
    ALLOW_INTERNAL_HOSTS, a storage host on the private network must be named exactly."""
    label_studio.storage = {"s3://bucket/a.jpg": PHOTO}
    label_studio.presign_to = f"http://internal.storage.test:{attacker.port}"
    resolver = lambda host, port: ["127.0.0.1"]  # noqa: E731
    wildcard = fetcher_for(label_studio.legacy_token, storage_hosts=("*.storage.test",), allow_internal_hosts=True,
                           resolver=resolver)  # fmt: skip
    with pytest.raises(ImageFetchError, match="internal address 127.0.0.1"):
        wildcard.fetch("s3://bucket/a.jpg", 1)
    named = fetcher_for(label_studio.legacy_token, storage_hosts=("internal.storage.test",), allow_internal_hosts=True,
                        resolver=resolver)  # fmt: skip
    assert named.fetch("s3://bucket/a.jpg", 1) == photos[PHOTO]


@pytest.mark.parametrize(
    ("overrides", "uri", "task_id", "message"),
    [
        ({"label_studio_url": None}, "s3://bucket/a.jpg", 1, "Set LABEL_STUDIO_URL"),
        ({}, "s3://bucket/a.jpg", None, "without its Label Studio task id"),
        ({}, "azure-blob://container/a.jpg", "1/../../api", "without its Label Studio task id"),
        ({}, "s3://bucket/" + "k" * 3000, 1, "over 2,048"),
    ],
)
def test_cloud_storage_uris_that_cannot_be_resolved(fetcher_for, label_studio, overrides, uri, task_id, message):
    with pytest.raises(ImageFetchError, match=message):
        fetcher_for(label_studio.legacy_token, **overrides).fetch(uri, task_id)
    assert label_studio.requests == []


def test_https_is_pinned_with_the_name_in_sni_and_the_certificate_check(fetcher_for, tmp_path, photos):
    cert = _certificate(tmp_path, "images.test")
    server = _tls_server(cert, photos[PHOTO])
    try:
        port = server.server_address[1]
        resolver = lambda host, port: ["127.0.0.1"]  # noqa: E731
        fetcher = fetcher_for(allowed_hosts=("*.test",), allow_internal_hosts=True, resolver=resolver,
                              ca_bundle=str(cert))  # fmt: skip
        assert fetcher.fetch(f"https://images.test:{port}/a.jpg") == photos[PHOTO]
        assert server.seen == [("images.test", f"images.test:{port}")]  # (SNI, Host)
        with pytest.raises(ImageFetchError, match="Could not download"):
            fetcher.fetch(f"https://other.test:{port}/a.jpg")  # the certificate is not for this name
    finally:
        server.shutdown()
        server.server_close()


def test_an_internal_ca_is_refused_by_default_with_the_setting_to_use(fetcher_for, tmp_path, photos):
    cert = _certificate(tmp_path, "images.test")
    server = _tls_server(cert, photos[PHOTO])
    try:
        url = f"https://images.test:{server.server_address[1]}/a.jpg"
        resolver = lambda host, port: ["127.0.0.1"]  # noqa: E731
        open_to = {"allowed_hosts": ("*.test",), "allow_internal_hosts": True, "resolver": resolver}
        with pytest.raises(ImageFetchError, match="certificate was not accepted.*REQUESTS_CA_BUNDLE"):
            fetcher_for(**open_to).fetch(url)  # certifi's bundle does not know this CA
        assert fetcher_for(ca_bundle=str(cert), **open_to).fetch(url) == photos[PHOTO]
        # VERIFY_SSL=false takes any certificate, even one for another name
        other = f"https://other.test:{server.server_address[1]}/a.jpg"
        assert fetcher_for(verify_ssl=False, **open_to).fetch(other) == photos[PHOTO]
    finally:
        server.shutdown()
        server.server_close()


def test_the_sdk_client_checks_certificates_against_the_ca_bundle(make_settings, tmp_path):
    cert = _certificate(tmp_path, "localhost")
    task = json.dumps({"id": 1, "data": {"image": "/data/upload/1/a.jpg"}, "project": 3}).encode()
    server = _tls_server(cert, task)
    try:
        base = f"https://localhost:{server.server_address[1]}"
        settings = make_settings(label_studio_url=base, label_studio_api_key="k" * 40)
        refused = pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED")
        with label_studio_client(settings, "A test") as client, refused as failed:
            client.tasks.get(1, request_options={"max_retries": 0})
        said = describe_failure(failed.value)  # what the operator reads in the log
        assert "HTTPS certificate was not accepted" in said and "REQUESTS_CA_BUNDLE" in said
        trusted = make_settings(label_studio_url=base, label_studio_api_key="k" * 40, ca_bundle=str(cert))
        with label_studio_client(trusted, "A test") as client:
            assert client.tasks.get(1).project == 3
        with pytest.raises(RuntimeError, match="client has been closed"):
            client.tasks.get(1)  # its connections closed on leaving the block: a worker runs for weeks
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_label_studio_call_is_described_by_its_cause_without_the_url_or_key(make_settings):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    settings = make_settings(label_studio_url=f"http://user:pw@127.0.0.1:{port}", label_studio_api_key="k" * 40)
    with label_studio_client(settings, "A test") as client, pytest.raises(httpx.ConnectError) as refused:
        client.tasks.get(1, request_options={"max_retries": 0})
    said = describe_failure(refused.value)
    assert said.startswith("ConnectError: ") and "refused" in said.lower()
    assert str(port) not in said and "pw" not in said and "k" * 40 not in said
    assert "LABEL_STUDIO_API_KEY" in describe_failure(ApiError(status_code=401, headers={}, body={"detail": "x"}))
    assert describe_failure(ApiError(status_code=502, headers={}, body="<html>proxy</html>")) == "HTTP 502"
    assert describe_failure(httpx.ProxyError("407 from http://u:secret@proxy:3128")) == "ProxyError"
    assert describe_failure(ValueError("task data")) == "ValueError"


def _flaky(statuses: list[int], body: bytes):
    """A route that answers each status of ``statuses`` in turn (0: drops the connection unanswered),
    then ``body``; it counts the requests it got."""
    calls = []

    def route(handler) -> None:
        calls.append(1)
        if len(calls) <= len(statuses):
            status = statuses[len(calls) - 1]
            if status == 0:
                handler.close_connection = True
                return
            handler._send(status, b"busy", **({"Retry-After": "1"} if status == 429 else {}))
            return
        handler._send(200, body, "image/jpeg")

    return route, calls


@pytest.mark.parametrize("failures", [[503, 502], [0], [429, 500]])
def test_transient_failures_are_retried_with_backoff(fetcher_for, attacker, photos, failures):
    route, calls = _flaky(failures, photos[PHOTO])
    attacker.extra_routes["/flaky"] = route
    fetcher = fetcher_for(allowed_hosts=("127.0.0.1",), allow_internal_hosts=True, fetch_retries=2)
    started = time.monotonic()
    assert fetcher.fetch(f"http://127.0.0.1:{attacker.port}/flaky") == photos[PHOTO]
    assert len(calls) == len(failures) + 1
    assert time.monotonic() - started >= RETRY_BACKOFF * (2 ** len(failures) - 1)  # it waited between tries


def test_retries_are_bounded_by_their_count_and_by_the_time_limit(fetcher_for, attacker, photos):
    route, calls = _flaky([503] * 100, photos[PHOTO])
    attacker.extra_routes["/down"] = route
    url = f"http://127.0.0.1:{attacker.port}/down"
    open_to = {"allowed_hosts": ("127.0.0.1",), "allow_internal_hosts": True}
    with pytest.raises(ImageFetchError, match="HTTP 503"):
        fetcher_for(fetch_retries=0, **open_to).fetch(url)
    assert len(calls) == 1
    with pytest.raises(ImageFetchError, match="HTTP 503"):
        fetcher_for(fetch_retries=2, **open_to).fetch(url)
    assert len(calls) == 1 + 3
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="HTTP 503"):
        fetcher_for(fetch_retries=10, fetch_timeout=2.0, **open_to).fetch(url)  # 0.5 + 1 s, then no time left
    assert time.monotonic() - started < 2.5
    assert len(calls) == 4 + 2


def test_answers_that_will_not_change_are_not_retried(fetcher_for, label_studio, attacker, photos):
    route, calls = _flaky([404, 404], photos[PHOTO])
    attacker.extra_routes["/gone"] = route
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher.fetch(f"http://127.0.0.1:{attacker.port}/gone")
    assert len(calls) == 1
    with pytest.raises(ImageFetchError, match="check LABEL_STUDIO_API_KEY"):
        fetcher_for("0" * 40).fetch(label_studio.upload_path(PHOTO))
    assert len(label_studio.requests) == 1  # a refused key is not tried again


def test_size_limit_from_the_header_and_while_streaming(fetcher_for, label_studio):
    fetcher = fetcher_for(label_studio.legacy_token, max_image_bytes=10_000)
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        fetcher.fetch(label_studio.upload_path(PHOTO))

    def no_length(handler):  # streams 50 kB without announcing it
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.end_headers()
        for _ in range(50):
            handler.wfile.write(b"\xff" * 1000)

    label_studio.extra_routes["/data/upload/1/stream"] = no_length
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        fetcher.fetch("/data/upload/1/stream")


def test_a_compressed_bomb_is_cut_at_the_size_limit(fetcher_for, label_studio):
    """A server that answers gzip although asked for identity: 200 MB of zeros in 200 kB."""
    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)

    def gzipped(handler):
        handler._send(200, bomb, "image/png", **{"Content-Encoding": "gzip"})

    label_studio.extra_routes["/data/upload/1/bomb.png"] = gzipped
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES=1,000,000"):
        fetcher_for(label_studio.legacy_token, max_image_bytes=1_000_000).fetch("/data/upload/1/bomb.png")


def _late(handler) -> None:  # nothing at all for 3 s
    time.sleep(3)
    handler.send_response(200)
    handler.end_headers()


@pytest.mark.parametrize(
    ("route", "timeout", "bound"),
    [(_late, 0.5, 2.5), (trickle, 1.0, 3), (trickle_headers, 1.0, 3)],
    ids=["silent", "trickled body", "trickled headers"],
)
def test_a_slow_server_hits_the_time_limit(fetcher_for, label_studio, photos, route, timeout, bound):
    """FETCH_TIMEOUT bounds the whole download: no single read of a trickling server times out."""
    label_studio.extra_routes["/data/upload/1/slow"] = route
    fetcher = fetcher_for(label_studio.legacy_token, fetch_timeout=timeout)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="Timed out after .* s \\(FETCH_TIMEOUT\\)"):
        fetcher.fetch("/data/upload/1/slow")
    assert time.monotonic() - started < bound
    assert fetcher.fetch(label_studio.upload_path(PHOTO)) == photos[PHOTO]  # the next download is not cut short


def test_the_time_limit_still_holds_after_a_token_refresh(fetcher_for, label_studio):
    """The refresh has a deadline of its own; the download's must be back in force after it."""
    label_studio.extra_routes["/data/upload/1/trickle"] = trickle
    fetcher = fetcher_for(label_studio.pat, fetch_timeout=1.0)  # no access token yet: the first fetch refreshes
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="FETCH_TIMEOUT"):
        fetcher.fetch("/data/upload/1/trickle")
    assert label_studio.refreshes == 1 and time.monotonic() - started < 3


def test_stalled_lookups_of_image_hosts_never_starve_label_studio(fetcher_for, label_studio, photos):
    def resolver(host: str, port: int) -> list[str]:
        if host.endswith(".example"):
            time.sleep(3)  # an attacker's name server that never answers in time
            return ["93.184.216.34"]
        return ["127.0.0.1"]

    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("*.example",), resolver=resolver,
                          fetch_timeout=1.0)  # fmt: skip
    errors = []
    stalled = [threading.Thread(target=lambda i=i: errors.append(_refused(fetcher, f"http://s{i}.example/a.jpg")))
               for i in range(40)]  # fmt: skip
    for thread in stalled:
        thread.start()
    time.sleep(0.2)
    assert fetcher.fetch(label_studio.upload_path(PHOTO)) == photos[PHOTO]  # while every lookup thread is stuck
    for thread in stalled:
        thread.join()
    assert len(errors) == 40 and all("resolving" in e for e in errors)


def _refused(fetcher: ImageFetcher, url: str) -> str:
    try:
        fetcher.fetch(url)
    except ImageFetchError as e:
        return str(e)
    return "fetched"


def test_a_slow_name_lookup_hits_the_time_limit(fetcher_for):
    def stuck(host: str, port: int) -> list[str]:
        time.sleep(5)
        return ["93.184.216.34"]

    fetcher = fetcher_for(allowed_hosts=("*",), resolver=stuck, fetch_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="resolving 'images.example.com'"):
        fetcher.fetch("http://images.example.com/a.jpg")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("length", ["\u00b2", "1e9", "-5", "99999999999999999999999999", "9" * 5000])
def test_odd_content_lengths_are_read_safely(fetcher_for, label_studio, length):
    """'²'.isdigit() is true, but int('²') raises: the body is read or refused, never a crash."""
    label_studio.extra_routes["/data/upload/1/odd"] = lambda h: h._send(200, b"x" * 10, "image/png",
                                                                         **{"Content-Length": length})  # fmt: skip
    fetcher = fetcher_for(label_studio.legacy_token, max_image_bytes=1000)
    with contextlib.suppress(ImageFetchError):  # refused with a reason is fine too; anything else fails
        assert fetcher.fetch("/data/upload/1/odd") == b"x" * 10


def test_messages_carry_no_query_string(fetcher_for, label_studio):
    signed = "X-Amz-Signature=SECRETSIGNATURE&X-Amz-Credential=AKIASECRET"
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    for url in (
        f"{label_studio.upload_path('missing.jpg')}?{signed}",  # HTTP 404
        f"http://127.0.0.1:1/a.jpg?{signed}",  # connection refused
        f"http://unresolvable.invalid/a.jpg?{signed}",
        f"http://127.0.0.1:{label_studio.port}\\x?{signed}",  # refused before parsing
    ):
        with pytest.raises(ImageFetchError) as refused:
            fetcher_for(label_studio.legacy_token, allowed_hosts=("*",), allow_internal_hosts=True).fetch(url)
        assert "SECRET" not in str(refused.value), refused.value
    with pytest.raises(ImageFetchError, match="Connection refused"):
        fetcher.fetch(f"http://127.0.0.1:1/a.jpg?{signed}")


def test_missing_file_reports_the_status(fetcher_for, label_studio):
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher_for(label_studio.legacy_token).fetch(label_studio.upload_path("nope.jpg"))


def test_label_studio_under_a_path_prefix(fetcher_for, label_studio, photos):
    label_studio.extra_routes["/ls/data/upload/1/photo.jpg"] = lambda h: h._file(PHOTO)
    fetcher = fetcher_for(label_studio.legacy_token, label_studio_url=f"{label_studio.url}/ls/")
    assert fetcher.fetch("/data/upload/1/photo.jpg") == photos[PHOTO]
    assert label_studio.requests[-1] == ("/ls/data/upload/1/photo.jpg", f"Token {label_studio.legacy_token}")
    with pytest.raises(ImageFetchError, match="outside the paths"):
        fetcher.fetch(f"{label_studio.url}/data/upload/1/{PHOTO}")  # outside the prefix


def test_data_uris(fetcher_for, photos):
    fetcher = fetcher_for(max_image_bytes=100_000)
    small = photos["n01443537_goldfish.JPEG"]
    assert len(small) < 100_000
    assert fetcher.fetch("data:image/jpeg;base64," + base64.b64encode(small).decode()) == small
    with pytest.raises(ImageFetchError, match="not valid base64"):
        fetcher.fetch("data:image/png;base64,@@@")
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        fetcher.fetch("data:image/png;base64," + "A" * 200_000)


def test_parse_strict_reserialises_what_it_checked():
    url = parse_strict("HTTP://Images.Example.COM:8080/a%20b/ä.jpg?x=1")
    assert (url.scheme, url.host, url.port) == ("http", "images.example.com", 8080)
    assert url.request_uri == "/a%20b/%C3%A4.jpg?x=1"


def _certificate(directory: Path, name: str) -> Path:
    """A self-signed certificate and key for ``name`` in one PEM file (openssl, as on any server)."""
    path = directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(path), "-out", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


def _tls_server(cert: Path, body: bytes):
    """An HTTPS server on 127.0.0.1 that records the (SNI, Host) of every request."""
    seen: list[tuple[str | None, str | None]] = []
    names: dict[int, str | None] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((names.get(id(self.request)), self.headers.get("Host")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert)
    context.sni_callback = lambda sock, name, ctx: names.__setitem__(id(sock), name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.seen = seen
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server
