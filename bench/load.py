"""Loopback load test: many clients asking /predict for cached tasks at once.

    python -m bench.load --clients 50 --seconds 60

Starts its own ``prelabel-backend`` (gunicorn, queue mode) and ``prelabel-worker`` on a Redis
database it may flush, warms the prediction cache with real photos, then lets ``--clients``
threads send single-task /predict calls for ``--seconds`` and reports requests/s, p50/p95
latency and errors. It measures serving, not the model: the toy CLIP is enough.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests

from bench import processes
from bench.photos import REPO, jpeg, photos
from common.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_tasks(count: int) -> list[dict]:
    """``count`` Label Studio tasks whose images are real photos as data: URIs."""
    uris = ["data:image/jpeg;base64," + base64.b64encode(jpeg(image, quality=85)).decode() for image in photos(count)]
    return [{"id": i, "data": {"image": uri}} for i, uri in enumerate(uris)]


def wait_for_workers(url: str, count: int, timeout: float) -> None:
    """Until the backend at ``url`` answers /health with ``count`` workers (each loads its model)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/health", timeout=1).json().get("workers", {}).get("count") == count:
                return
        except (requests.RequestException, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("backend or workers did not start")
        time.sleep(0.3)


def run(clients: int, seconds: float, tasks: int, redis_url: str, checkpoint: str, threads: int) -> dict:
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    settings = Settings(
        redis_url=redis_url, model_checkpoint=checkpoint, image_size=64, model_dir=Path(tempfile.mkdtemp())
    )
    env = {**os.environ, **settings.to_env()}
    backend = subprocess.Popen([sys.executable, "-m", "backend.cli", "--host", "127.0.0.1", "--port", str(port),
                                "--threads", str(threads)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    config = (REPO / "label_config" / "voc_tags_and_masks.xml").read_text()
    try:
        wait_for_workers(url, 1, 120)
        pool = photo_tasks(tasks)
        warm = requests.post(f"{url}/predict", json={"tasks": pool, "label_config": config}, timeout=100)
        warm.raise_for_status()

        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def client(index: int) -> None:
            with requests.Session() as session:  # closed when the client is done
                i = index
                while time.monotonic() < stop_at:
                    body = {"tasks": [pool[i % len(pool)]], "label_config": config}
                    started = time.perf_counter()
                    try:
                        ok = session.post(f"{url}/predict", json=body, timeout=30).status_code == 200
                    except requests.RequestException:
                        ok = False
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        if ok:
                            latencies.append(elapsed)
                        else:
                            errors[0] += 1
                    i += clients

        workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.monotonic()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        processes.stop(backend, worker)
        redis.Redis.from_url(redis_url).flushdb()
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies) + errors[0],
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(ordered[round(0.95 * (len(ordered) - 1))], 1) if ordered else None,
        "errors": errors[0],
        "backend_threads": threads,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--tasks", type=int, default=20, help="distinct cached tasks")
    parser.add_argument("--threads", type=int, default=8, help="backend threads (prelabel-backend --threads)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis database the run may flush")
    parser.add_argument("--checkpoint", default=str(REPO / "bench" / "models" / "toy-clip"))
    args = parser.parse_args(argv)
    result = run(args.clients, args.seconds, args.tasks, args.redis, args.checkpoint, args.threads)
    print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
