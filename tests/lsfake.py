"""A stand-in for the parts of Label Studio a worker talks to: ``/data/upload/...`` behind token
auth and ``/api/token/refresh/`` for personal access tokens. It checks the headers exactly as
Label Studio 1.23.2 does (PROTOCOL.md section 0); the end-to-end test uses the real thing."""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def trickle(handler: BaseHTTPRequestHandler, count: int = 1000) -> None:
    """A route that sends one byte every 0.1 s (of ``count`` announced): no single read times out."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(count))
    handler.end_headers()
    for _ in range(count):
        handler.wfile.write(b"\xff")
        handler.wfile.flush()
        time.sleep(0.1)


def trickle_headers(handler: BaseHTTPRequestHandler) -> None:
    """A route whose header line never ends: a byte every 0.1 s for 30 s."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(300):
        handler.wfile.write(b"a")
        handler.wfile.flush()
        time.sleep(0.1)


def make_jwt(claims: dict) -> str:
    """An unsigned JWT-shaped token (Label Studio's PATs and access tokens look like this)."""

    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.{secrets.token_urlsafe(16)}"


class FakeLabelStudio:
    """Serves files from ``files`` (name -> bytes) at ``/data/upload/1/<name>`` and ``/raw/<name>``;
    redirects to ``?to=`` at any path ending in ``/redirect`` and (with auth, as a storage resolve)
    at ``/tasks/1/resolve/``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.legacy_token = secrets.token_hex(20)
        self.pat = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600})
        self.access_tokens: set[str] = set()
        self.refreshes = 0
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header) of every GET
        self.headers: list[dict[str, str]] = []  # all headers of every GET
        self.extra_routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        #: Objects of a connected cloud storage (URI -> name in ``files``), served by the storage
        #: resolver ``/tasks/<id>/resolve/?fileuri=<base64>``: streamed, or with ``presign_to``
        #: set, a 303 to ``<presign_to>/raw/<name>?X-Amz-Signature=...`` as for a presigned URL.
        self.storage: dict[str, str] = {}
        self.presign_to: str | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base URL under the name ``localhost`` (``127.0.0.1`` then counts as another host)."""
        return f"http://localhost:{self.port}"

    def upload_path(self, name: str) -> str:
        return f"/data/upload/1/{name}"

    def start(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_slowly(self, path: str, name: str, seconds: float, content_type: str = "image/png") -> None:
        """Serve the file ``name`` at ``path`` after ``seconds``: an image slow to download."""

        def slow(handler: BaseHTTPRequestHandler) -> None:
            time.sleep(seconds)
            handler._send(200, self.files[name], content_type)

        self.extra_routes[path] = slow

    def expire_access_tokens(self) -> None:
        self.access_tokens.clear()

    def _authorized(self, header: str | None) -> bool:
        if header == f"Token {self.legacy_token}":
            return True
        return bool(header and header.startswith("Bearer ") and header[7:] in self.access_tokens)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json", **headers) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/token/refresh/":
                    fake.refreshes += 1
                    if body.get("refresh") != fake.pat:
                        return self._send(401, b'{"detail": "Token is invalid"}')
                    access = make_jwt({"token_type": "access", "exp": int(time.time()) + 300})
                    fake.access_tokens.add(access)
                    return self._send(200, json.dumps({"access": access}).encode())
                self._send(404, b"{}")

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                fake.requests.append((parts.path, self.headers.get("Authorization")))
                fake.headers.append(dict(self.headers.items()))
                if parts.path in fake.extra_routes:
                    return fake.extra_routes[parts.path](self)
                fileuri = parse_qs(parts.query).get("fileuri")
                if fileuri and re.fullmatch(r"/tasks/\d+/resolve/", parts.path):
                    if not fake._authorized(self.headers.get("Authorization")):
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    name = fake.storage.get(base64.urlsafe_b64decode(fileuri[0]).decode())
                    if name is None:
                        return self._send(404, b"")
                    if fake.presign_to:
                        return self._send(303, b"", Location=f"{fake.presign_to}/raw/{name}?X-Amz-Signature=s3cr3t")
                    return self._file(name)
                if parts.path.endswith("/redirect") or parts.path == "/tasks/1/resolve/":  # resolve needs auth
                    if parts.path.startswith("/tasks/") and not fake._authorized(self.headers.get("Authorization")):
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    target = parse_qs(parts.query)["to"][0]
                    return self._send(302, b"", Location=target)
                if parts.path.startswith("/data/upload/1/"):
                    if not fake._authorized(self.headers.get("Authorization")):
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    return self._file(parts.path.removeprefix("/data/upload/1/"))
                if parts.path.startswith("/raw/"):
                    return self._file(parts.path.removeprefix("/raw/"))
                self._send(404, b"{}")

            def _file(self, name: str) -> None:
                if name not in fake.files:
                    return self._send(404, b'{"detail": "Not found."}')
                self._send(200, fake.files[name], "application/octet-stream")

        return Handler
