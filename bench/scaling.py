"""Bulk work and interactive tasks: does an annotator wait behind a selection, and do workers add up?

    python -m bench.scaling --tasks 24 --workers 1 2

Starts its own ``prelabel-backend`` and ``--workers`` ``prelabel-worker`` processes on a Redis
database it may flush, one CPU thread per worker (a worker stands for a GPU: one compute unit
each). For each worker count it sends a Retrieve Predictions of ``--tasks`` uncached photos and,
while that selection runs, an annotator opening one other task; it reports the selection's time,
the opened task's time, their ratio and the chunk size. It measures the queue, not the model: the
toy CLIP is enough.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests

from bench.load import free_port, photo_tasks, wait_for_workers
from bench.photos import REPO
from bench.processes import stop
from common.settings import Settings

CONFIG = (REPO / "label_config" / "voc_tags_and_masks.xml").read_text()


def _predict(url: str, tasks: list[dict]) -> tuple[float, requests.Response]:
    started = time.perf_counter()
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=100)
    response.raise_for_status()
    return time.perf_counter() - started, response


def _renumber(tasks: list[dict], start: int) -> list[dict]:
    """The same images under new task ids: uncached, so each round does the work again."""
    return [{"id": start + i, "data": t["data"]} for i, t in enumerate(tasks)]


def run(workers: int, tasks: int, chunk: int, size: int, redis_url: str, checkpoint: str, delay: float) -> dict:
    """One round per worker count: a warm-up selection, then the timed selection and the opened task."""
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(redis_url=redis_url, model_checkpoint=checkpoint, image_size=size, max_tasks_per_job=chunk,
                        predict_timeout=95.0, model_dir=Path(tempfile.mkdtemp()))  # fmt: skip
    env = {**os.environ, **settings.to_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    port = free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([sys.executable, "-m", "backend.cli", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, **quiet)]  # fmt: skip
    processes += [subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, **quiet) for _ in range(workers)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_workers(url, workers, 180)
        pool = photo_tasks(tasks + 1)
        selection, opened = pool[:tasks], pool[tasks]
        _predict(url, _renumber(selection, 10_000)[: workers * chunk])  # every worker loads and runs once

        answers: dict[str, float] = {}

        def annotator() -> None:
            time.sleep(delay)
            answers["opened_s"], _ = _predict(url, _renumber([opened], 30_000))

        thread = threading.Thread(target=annotator)
        thread.start()
        seconds, response = _predict(url, _renumber(selection, 20_000))
        thread.join()
        progress = requests.get(f"{url}/jobs/{response.headers['X-Prelabel-Request']}", timeout=10).json()
    finally:
        stop(*processes)
        redis.Redis.from_url(redis_url).flushdb()
    served = sum(1 for p in response.json()["results"] if p)
    return {
        "workers": workers,
        "tasks": tasks,
        "chunk": chunk,
        "chunks": progress["chunks"]["total"],
        "image_size": size,
        "selection_s": round(seconds, 2),
        "served": served,
        "opened_task_s": round(answers["opened_s"], 2),
        "opened_over_selection": round(answers["opened_s"] / seconds, 2),
        "chunk_s": round(seconds / progress["chunks"]["total"] * workers, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks", type=int, default=24, help="tasks in the Retrieve Predictions selection")
    parser.add_argument("--chunk", type=int, default=8, help="MAX_TASKS_PER_JOB")
    parser.add_argument("--size", type=int, default=224, help="IMAGE_SIZE")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds into the selection the task is opened")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis database the run may flush")
    parser.add_argument("--checkpoint", default=str(REPO / "bench" / "models" / "toy-clip"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for count in args.workers:
        row = run(count, args.tasks, args.chunk, args.size, args.redis, args.checkpoint, args.delay)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    if len(rows) > 1:
        print(f"speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: "
              f"{rows[0]['selection_s'] / rows[-1]['selection_s']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
