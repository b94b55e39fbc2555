"""The README's start command for real: `prelabel-backend` under gunicorn, over HTTP."""

import os
import subprocess
import sys
import time

import pytest
import requests

from bench import processes
from tests.conftest import settings_env
from tests.labelstudio import free_port


@pytest.fixture
def backend_server(make_settings, label_studio, tmp_path):
    settings = make_settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token)
    port = free_port()
    log_path = tmp_path / "backend.log"
    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "backend.cli", "--host", "127.0.0.1", "--port", str(port), "--workers", "3"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).json()["model"]["state"] == "ready":
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            processes.stop(process)
            pytest.fail(f"prelabel-backend did not become ready:\n{log_path.read_text()}")
        time.sleep(0.2)
    yield url, settings, log_path
    processes.stop(process)


def test_backend_serves_predictions_for_real_photos_over_http(backend_server, label_studio, voc_config):
    url, settings, log_path = backend_server
    setup = requests.post(f"{url}/setup", json={"project": "1.1", "schema": voc_config}, timeout=3)
    assert setup.json() == {"model_version": settings.model_version}
    tasks = [{"id": 7, "data": {"image": label_studio.upload_path("2011_000006.jpg")}}]
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": voc_config}, timeout=100)
    assert response.status_code == 200
    (prediction,) = response.json()["results"]
    assert prediction["model_version"] == settings.model_version
    assert prediction["result"][0]["value"]["choices"]
    log = log_path.read_text()
    assert "using 1 process so the model loads once" in log  # --workers 3 is refused in embedded mode
    assert "predict: 1 tasks (0 cached, 0 without prediction)" in log
    assert label_studio.legacy_token not in log  # secrets never reach the logs


def _backend(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "WEBHOOK_SECRET")}
    command = [sys.executable, "-m", "backend.cli", *args]
    return subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_the_backend_refuses_to_serve_the_network_without_auth(host):
    done = _backend(["--host", host, "--port", str(free_port())], {"LABEL_STUDIO_API_KEY": "x" * 40})
    assert done.returncode != 0
    assert f"refusing to serve {host} without auth" in done.stderr and "BASIC_AUTH_USER" in done.stderr


def test_the_webhook_header_for_a_project_is_printed_for_manual_setup():
    from backend.webhook_secret import project_secret

    done = _backend(["--webhook-header", "7"], {"WEBHOOK_SECRET": "hook-s3cret"})
    assert done.returncode == 0
    assert done.stdout.strip() == f"X-Prelabel-Secret: {project_secret('hook-s3cret', 7)}"
    assert "hook-s3cret" not in done.stdout
    assert _backend(["--webhook-header", "7"], {}).returncode != 0  # no secret to derive it from


def test_metrics_sum_every_gunicorn_process(make_settings, redis_url, voc_config, tmp_path):
    """Three processes answer /predict from the cache; any of them, scraped, counts every answer."""
    import re

    import redis

    from backend.serving import RedisCache, cache_key
    from common import keys

    settings = make_settings(redis_url=redis_url)
    tasks = [{"id": i, "data": {"image": f"data:image/png;base64,{i}"}} for i in range(4)]
    RedisCache(redis.Redis.from_url(redis_url)).put_many({
        cache_key(settings.model_version, voc_config, t["id"], t["data"]["image"]): {"result": [], "score": 0.5}
        for t in tasks
    })  # fmt: skip
    port, log_path = free_port(), tmp_path / "backend.log"
    env = {**os.environ, **settings_env(settings)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "backend.cli", "--host", "127.0.0.1", "--port", str(port), "--workers", "3"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/health", timeout=1)
                break
            except requests.RequestException:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        sent, pids = 0, set()
        while len(pids) < 2:  # until two processes have answered (each request opens a new connection)
            body = {"tasks": [tasks[sent % 4]], "label_config": voc_config}
            assert requests.post(f"{url}/predict", json=body, timeout=10).status_code == 200
            sent += 1
            pids = set(re.findall(r"\[(\d+)\]: predict: 1 tasks \(1 cached", log_path.read_text()))
            assert sent < 300, "gunicorn never spread requests over its processes"
        for _ in range(6):
            text = requests.get(f"{url}/metrics", timeout=10).text
            assert f"prelabel_predict_seconds_count {float(sent)}" in text
            assert f"prelabel_predict_tasks_total {float(sent)}" in text
        # Each process beats (backend/deliveries.py); stopped cleanly, each says it left, so that
        # another takes its late jobs over at once instead of ALIVE_TTL seconds later.
        connection = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while len(list(connection.scan_iter(keys.backend_alive("*")))) < 3:  # the third may still be starting
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    finally:
        assert not processes.stop(process)
    assert list(connection.scan_iter(keys.backend_alive("*"))) == []
