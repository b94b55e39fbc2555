"""Image fetching: Label Studio auth (legacy token and PAT), and every refusal rule."""

import base64
import time

import pytest

from backend.errors import ImageFetchError
from worker.fetch import ImageFetcher, is_personal_access_token

PHOTO = "2011_000003.jpg"


@pytest.fixture
def fetcher_for(make_settings, label_studio):
    def build(api_key=None, **overrides) -> ImageFetcher:
        overrides.setdefault("label_studio_url", label_studio.url)
        return ImageFetcher(make_settings(label_studio_api_key=api_key, **overrides))

    return build


def test_relative_upload_path_uses_the_legacy_token(fetcher_for, label_studio, photos):
    data = fetcher_for(label_studio.legacy_token).fetch(label_studio.upload_path(PHOTO))
    assert data == photos[PHOTO]
    assert label_studio.requests[-1] == (f"/data/upload/1/{PHOTO}", f"Token {label_studio.legacy_token}")


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
        ("/data/local-files/?d=../../etc/passwd", "'\\.\\.'"),
        ("/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", "'\\.\\.'"),
        ("http://images.example.com/a.jpg", "not in ALLOWED_HOSTS|neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS"),
    ],
)
def test_refused_urls(fetcher_for, url, message):
    with pytest.raises(ImageFetchError, match=message):
        fetcher_for("t" * 40).fetch(url)


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
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://0.0.0.0/a.jpg",
    ],
)
def test_internal_addresses_are_refused_even_when_every_host_is_allowed(fetcher_for, url):
    with pytest.raises(ImageFetchError, match="internal address"):
        fetcher_for(allowed_hosts=("*",)).fetch(url)


def test_internal_host_can_be_allowed_explicitly_and_gets_no_token(fetcher_for, label_studio, photos):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    assert fetcher.fetch(f"http://127.0.0.1:{label_studio.port}/raw/{PHOTO}") == photos[PHOTO]
    assert label_studio.requests[-1] == (f"/raw/{PHOTO}", None)  # the API key only goes to Label Studio


def test_every_redirect_hop_is_checked(fetcher_for, label_studio, photos):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("*",))
    with pytest.raises(ImageFetchError, match="internal address 169.254.169.254"):
        fetcher.fetch("/redirect?to=http://169.254.169.254/latest/meta-data/")
    # a redirect that stays on Label Studio keeps working, with the token
    assert fetcher.fetch(f"/redirect?to={label_studio.upload_path(PHOTO)}") == photos[PHOTO]
    assert label_studio.requests[-1][1] == f"Token {label_studio.legacy_token}"


def test_token_is_not_forwarded_across_a_redirect(fetcher_for, label_studio, photos):
    fetcher = fetcher_for(label_studio.legacy_token, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
    target = f"http://127.0.0.1:{label_studio.port}/raw/{PHOTO}"
    assert fetcher.fetch(f"/redirect?to={target}") == photos[PHOTO]
    assert label_studio.requests[-1] == (f"/raw/{PHOTO}", None)


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

    label_studio.extra_routes["/stream"] = no_length
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        fetcher.fetch("/stream")


def test_slow_server_hits_the_time_limit(fetcher_for, label_studio):
    def slow(handler):
        time.sleep(3)
        handler.send_response(200)
        handler.end_headers()

    label_studio.extra_routes["/slow"] = slow
    fetcher = fetcher_for(label_studio.legacy_token, fetch_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="Timed out"):
        fetcher.fetch("/slow")
    assert time.monotonic() - started < 2.5


def test_missing_file_reports_the_status(fetcher_for, label_studio):
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher_for(label_studio.legacy_token).fetch(label_studio.upload_path("nope.jpg"))


def test_data_uris(fetcher_for, photos):
    fetcher = fetcher_for(max_image_bytes=100_000)
    small = photos["n01443537_goldfish.JPEG"]
    assert len(small) < 100_000
    assert fetcher.fetch("data:image/jpeg;base64," + base64.b64encode(small).decode()) == small
    with pytest.raises(ImageFetchError, match="not valid base64"):
        fetcher.fetch("data:image/png;base64,@@@")
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        fetcher.fetch("data:image/png;base64," + "A" * 200_000)
