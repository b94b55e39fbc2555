"""Real services for end-to-end tests: Label Studio 1.23.2 started headless from its own
virtualenv (scripts/setup-label-studio) as PROTOCOL.md section 7 describes and driven through
its REST API, and prelabel's backend, predict worker and training worker as the README starts them."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests

from bench import processes
from common.settings import Settings

REPO = Path(__file__).resolve().parents[1]
LS_BIN = Path(os.environ.get("PRELABEL_LS_VENV", REPO / ".venv-ls")) / "bin" / "label-studio"


VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
#: prelabel's services, as docker-compose.yml runs them.
SERVICES = ("backend", "worker", "trainer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gate:
    """A TCP relay on loopback to ``target_port`` that can be shut (new connections refused, open
    ones cut) and opened again on the same port: a network cut between prelabel and Label Studio,
    with the real Label Studio behind it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._relayed: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def shut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; the port refuses from now on
            listener.close()
        with self._lock:
            relayed, self._relayed = self._relayed, set()
        for sock in relayed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # shut
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._relayed.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class LabelStudio:
    """One Label Studio process with an admin whose legacy token drives the API."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.url = f"http://localhost:{port}"
        self.port = port
        self.legacy_token = secrets.token_hex(20)
        self.email, self.password = "admin@example.com", secrets.token_hex(8)
        self.log_path = data_dir / "label-studio.log"
        self._process: subprocess.Popen | None = None
        self._pat: str | None = None

    def start(self, timeout: float = 180) -> LabelStudio:
        if not LS_BIN.exists():
            raise RuntimeError(f"{LS_BIN} not found: run scripts/setup-label-studio (scripts/test does).")
        env = {
            **os.environ,
            "SECRET_KEY": secrets.token_hex(32),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LATEST_VERSION_CHECK": "false",
            # a backend on localhost is a "reserved network address" to Label Studio >= 1.23.1
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
        }
        for key in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "VIRTUAL_ENV"):
            env.pop(key, None)  # prelabel's settings are not Label Studio's
        command = [
            str(LS_BIN), "start", "--no-browser", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--username", self.email, "--password", self.password,
            "--user-token", self.legacy_token, "--enable-legacy-api-token",
        ]  # fmt: skip
        with open(self.log_path, "w") as log:
            self._process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Label Studio exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Label Studio did not start within {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self._process is not None:
            processes.stop(self._process)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Token {self.legacy_token}"}
        response = requests.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token), created once."""
        if self._pat is None:
            self._pat = self.api("POST", "/api/token/")["token"]
        return self._pat

    # The calls a user makes in the UI, in order.

    def create_project(self, title: str, label_config: str) -> int:
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]

    def upload(self, project: int, path: Path) -> None:
        with open(path, "rb") as f:
            self.api("POST", f"/api/projects/{project}/import", files={"file": (path.name, f)})

    def connect_backend(
        self, project: int, url: str, user: str, password: str, extra_params: dict | None = None
    ) -> dict:
        """Settings > Model > Connect model, with basic auth and, optionally, "Extra params"."""
        return self.api("POST", "/api/ml", json={
            "url": url, "project": project, "title": "prelabel", "is_interactive": False,
            "auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password,
            "extra_params": extra_params,
        })  # fmt: skip

    def retrieve_predictions(self, project: int, tasks: list[int] | None = None) -> dict:
        """Actions > Retrieve Predictions on all tasks, or on the ``tasks`` selected."""
        selected = {"all": True, "excluded": []} if tasks is None else {"all": False, "included": tasks}
        return self.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                        json={"selectedItems": selected})  # fmt: skip

    def open_task(self, task: int) -> dict:
        """What the editor loads when an annotator opens a task: Label Studio asks the ML backend
        for this one task first when it has no prediction (with predictions to pre-label on)."""
        return self.api("GET", f"/api/tasks/{task}/")

    def tasks(self, project: int) -> list[dict]:
        body = self.api("GET", f"/api/tasks?project={project}&page_size=1000")
        return body["tasks"] if isinstance(body, dict) else body

    def predictions(self, task: int) -> list[dict]:
        return self.api("GET", f"/api/predictions/?task={task}")

    def annotate(self, task: int, result: list[dict], lead_time: float | None = None) -> dict:
        """Submit an annotation; ``lead_time`` is the seconds the editor had the task open (it sends them)."""
        return self.api("POST", f"/api/tasks/{task}/annotations/", json={"result": result, "lead_time": lead_time})

    def start_training(self, backend: int) -> dict:
        """The "Start Training" button of the model's settings."""
        return self.api("POST", f"/api/ml/{backend}/train")

    def connect_s3(self, project: int, bucket: str, prefix: str, endpoint: str, presign: bool) -> int:
        """Source cloud storage: an S3 bucket (here a moto server), its objects as ``s3://`` tasks."""
        storage = self.api("POST", "/api/storages/s3", json={
            "project": project, "title": bucket, "bucket": bucket, "prefix": prefix, "regex_filter": ".*",
            "use_blob_urls": True, "presign": presign, "presign_ttl": 5, "s3_endpoint": endpoint,
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1",
        })  # fmt: skip
        self.api("POST", f"/api/storages/s3/{storage['id']}/sync")
        return storage["id"]

    def stored_tasks(self, project: int) -> list[dict]:
        """The tasks with their data as stored (cloud storage URIs not rewritten to Label Studio's resolver)."""
        body = self.api("GET", f"/api/tasks?project={project}&page_size=1000&resolve_uri=false")
        return body["tasks"] if isinstance(body, dict) else body

    def webhooks(self, project: int) -> list[dict]:
        return self.api("GET", f"/api/webhooks/?project={project}")

    def wait_for_webhook_secret(self, project: int) -> None:
        """Until prelabel has added its secret header to the project's webhook: each Retrieve
        Predictions runs /setup, which schedules it."""
        deadline = time.monotonic() + 30
        while not all(hook["headers"].get("X-Prelabel-Secret") for hook in self.webhooks(project)):
            assert time.monotonic() < deadline, "prelabel did not add its secret header to the webhook"
            self.retrieve_predictions(project)
            time.sleep(0.5)


class Prelabel:
    """prelabel-backend, one prelabel-worker and a training worker, as the README starts them."""

    def __init__(self, settings: Settings, workdir: Path, services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        # Label Studio calls the backend at this URL, which is the one the webhook secret goes to.
        self.env = {**os.environ, "PRELABEL_URL": self.url, **settings.to_env()}
        self.backend_log, self.worker_log = workdir / "backend.log", workdir / "worker.log"
        self.trainer_log = workdir / "trainer.log"
        for log_path in (self.backend_log, self.worker_log, self.trainer_log):
            log_path.write_text("")
        self.auth = (settings.basic_auth_user, settings.basic_auth_pass)
        self.processes: dict[str, subprocess.Popen] = {}
        for service in services:
            self.start(service)

    def start(self, service: str) -> None:
        """Start ``service`` (one of SERVICES), in a process group of its own (see ``kill``)."""
        command, log_path = {
            "backend": ([VENV_BIN / "prelabel-backend", "--port", str(self.port)], self.backend_log),
            "worker": ([VENV_BIN / "prelabel-worker"], self.worker_log),
            "trainer": ([VENV_BIN / "prelabel-worker", "train"], self.trainer_log),
        }[service]
        with open(log_path, "a") as log:
            self.processes[service] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                       start_new_session=True)  # fmt: skip

    def kill(self, service: str) -> None:
        """SIGKILL the service and its children (gunicorn's workers): a crash, nothing cleaned up."""
        process = self.processes.pop(service)
        _kill_group(process)
        process.wait()

    def pause(self, service: str) -> None:
        """SIGSTOP the service: it stays registered (a worker busy elsewhere) but runs nothing."""
        os.killpg(self.processes[service].pid, signal.SIGSTOP)

    def resume(self, service: str) -> None:
        os.killpg(self.processes[service].pid, signal.SIGCONT)

    def terminate(self, service: str, within: float = 30) -> None:
        """SIGTERM: the service stops as on a deploy, and must exit ``within`` seconds."""
        process = self.processes.pop(service)
        killed = processes.stop(process, timeout=within)
        _kill_group(process)
        assert not killed, f"{service} did not exit within {within} s of SIGTERM"

    def get(self, path: str) -> dict:
        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"{self.url}/health", timeout=2).json()
                if health.get("workers", {}).get("count") == 1:
                    return
            except (requests.RequestException, ValueError):
                pass
            if any(p.poll() is not None for p in self.processes.values()):
                break
            time.sleep(0.5)
        raise AssertionError(f"prelabel did not start:\n{self.backend_log.read_text()}\n{self.worker_log.read_text()}")

    def stop(self) -> None:
        processes.stop(*self.processes.values())
        for process in self.processes.values():
            _kill_group(process)  # a gunicorn worker left by a master that had to be killed


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(process.pid, signal.SIGKILL)
