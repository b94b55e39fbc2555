"""Throughput benchmark: how close prelabel runs to the bare encoder, and what serving costs.

    python -m bench.throughput --out docs/benchmarks.md --json docs/benchmarks.json

Side by side, in one run, on one device, in the precision the pipeline picks (ViT-B/16 with random
weights by default: speed does not depend on the weights, except for how many classes CWR
re-identifies; random weights make every class a candidate, so each image costs the maximum,
CWR_MAX_CLASSES crops):

1. the ceiling: the bare image encoder at 224, and on the same photos at the same working sizes
   and batches as the pipeline;
2. prelabel's tags only, and tags + masks, in images/s and as a ratio to (1) on the same inputs,
   and the latency of one 512 x 384 photo alone;
3. one task per request through backend + Redis + a worker process vs in-process: p50/p95
   latency per task, and the queue's overhead per request (its latency minus the worker's own
   time on the job);
4. /predict answered from the prediction cache: p50/p95;
5. CLIPSelf training: steps/s, and the time a run of TRAIN_STEPS takes (it does not depend on
   how many corrections there are: 200 corrections or 20, a run is TRAIN_STEPS steps); and the
   ZegCLIP head's steps/s.

Beside each images/s figure of (1) and (2), the floating-point operations per image (counted, so
the same on every device): their ratio is what a compute-bound device, a GPU at large batch,
approaches, and they say what throughput target asks what share of a GPU's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.server
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
import torch
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from backend.app import create_app
from bench import processes
from bench.photos import DATA, REPO, jpeg, photos
from bench.publish import publish
from common.jobs import PREDICT_QUEUE, BrushControl, ChoicesControl, ClassLabel
from common.labelstudio.brush import draw_scaled, scaled_mask_to_rle
from common.settings import Settings
from worker.images import decode_for_model, decode_image
from worker.loading import load_clip
from worker.model import dense, vit
from worker.model.bundle import autocast
from worker.predictor import Predictor, same_size_batches
from worker.training.clipself import CLIPSelfConfig, train_clipself
from worker.training.corrections import Correction
from worker.training.zegclip import BATCH_SIZE as ZEGCLIP_BATCH
from worker.training.zegclip import load_voc_folder, train_zegclip

#: NVIDIA's dense bf16 tensor-core peak of an H100 SXM, TFLOP/s (datasheet, without sparsity).
H100_BF16_TFLOPS = 989.4
#: The issue's throughput target on one H100, images/s of tags + masks.
TARGET_IMAGES_PER_S = 300

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
       "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(run, count: int, device: torch.device, repeats: int) -> float:
    run()  # warm-up (and CUDA kernel selection)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return count * repeats / (time.perf_counter() - started)


def gigaflops(run, count: int) -> float:
    """GFLOP per image of ``run`` over ``count`` images: matrix products, convolutions and attention
    (SDPA counted through its math form), as torch's FlopCounterMode counts them. Elementwise work,
    softmaxes and the CPU parts (connected components, RLE) are left out: they are small next to the
    ViT's products."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        run()
    return counter.get_total_flops() / count / 1e9


def ceiling(predictor: Predictor, images: list[Image.Image], batch: int, repeats: int) -> dict[str, float]:
    """The bare encoder (SDPA attention, no TagCLIP) in the pipeline's precision: on square 224
    inputs, and on the pipeline's own inputs (the same photos at the same working sizes, batched
    the same way), which is the ceiling the pipeline is compared with; and its GFLOP per image."""
    bundle = predictor.bundle
    batches = same_size_batches(enumerate(predictor.prepare(images)), batch)
    working = [torch.stack([image.pixels for _, image in chunk]).to(bundle.device) for chunk in batches]
    square = [torch.randn(batch, 3, 224, 224, device=bundle.device)]

    def encoder(batches: list[torch.Tensor]) -> tuple[Callable[[], None], int]:
        def run() -> None:
            with torch.inference_mode(), autocast(bundle):
                for pixels in batches:
                    vit.encode_tokens(bundle.visual, pixels)

        return run, sum(len(b) for b in batches)

    return {
        "224": images_per_second(*encoder(square), bundle.device, repeats),
        "working": images_per_second(*encoder(working), bundle.device, repeats),
        "working GFLOP": gigaflops(*encoder(working)),
    }


def pipeline(predictor: Predictor, images: list[Image.Image], repeats: int) -> dict[str, float]:
    """Images/s from decoded photos to tags and masks (resizing to the working size included), and
    GFLOP per image of each row."""
    labels = tuple(ClassLabel(name, (name,)) for name in VOC)
    choices = (ChoicesControl("tags", "image", labels, True),)
    brushes = (BrushControl("mask", "image", labels),)

    def runner(controls: tuple, batch: list[Image.Image] = images) -> tuple[Callable[[], None], int]:
        def run() -> None:
            predictor.run(list(range(len(batch))), predictor.prepare(batch), *controls)

        return run, len(batch)

    def rate(controls: tuple, batch: list[Image.Image] = images) -> float:
        return images_per_second(*runner(controls, batch), predictor.bundle.device, repeats)

    out = {}
    for name, controls in (("tags", (choices, ())), ("tags+masks", (choices, brushes))):
        out[name], out[f"{name} GFLOP"] = rate(controls), gigaflops(*runner(controls))
    # Random weights make every class a CWR candidate, so each image costs the most crops; with real
    # weights a photo has a few candidates. The same run with at most 2 crops shows what that is worth.
    full = predictor.config
    predictor.config = dataclasses.replace(full, cwr_max_classes=2)
    try:
        out["tags+masks, 2 crops"] = rate((choices, brushes))
        out["tags+masks, 2 crops GFLOP"] = gigaflops(*runner((choices, brushes)))
    finally:
        predictor.config = full
    # One 512 x 384 photo alone, as a CPU host meets it: the latency of its tags + masks.
    out["one 512 px image s"] = 1 / rate((choices, brushes), [images[0].resize((512, 384))])
    return out


def decoding(predictor: Predictor, repeats: int) -> dict[str, float]:
    """Milliseconds to turn a 12-megapixel JPEG (a phone photo) into model input: decoded in full
    then resized, or decoded at a reduced DCT scale first, as the worker does."""
    data = jpeg(photos(1)[0].resize((4032, 3024), Image.Resampling.BICUBIC))
    limit = predictor.settings.max_image_pixels

    def full() -> None:
        image = decode_image(data, limit)
        predictor.prepare_image(image, image.size)

    def reduced() -> None:
        image, size = decode_for_model(data, limit, predictor.settings.image_size)
        predictor.prepare_image(image, size)

    return {name: 1000 / images_per_second(run, 1, torch.device("cpu"), repeats) for name, run in
            (("full", full), ("reduced", reduced))}  # fmt: skip


def mask_output(repeats: int) -> dict[str, float]:
    """Milliseconds to turn one 12-megapixel photo's class logits into 3 brush masks (upsampling,
    best class per pixel, connected regions) and to encode them as Label Studio's RLE at the
    photo's size: ours (from the working-size masks) and the SDK's (from masks drawn at full
    size, drawing not counted). CPU work after the model for every image with masks."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 28, 28, 37, generator=generator) * 3  # 3 labels and 25 background words
    logits = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)[0] * 5  # smooth, blob-like regions
    size = (4032, 3024)
    masks = dense.masks_from_logits(logits, 3, size, 0.002)
    painted = [draw_scaled(m.region, m.size).astype("uint8") * 255 for m in masks]

    def timed(run) -> float:
        return 1000 / images_per_second(run, 1, torch.device("cpu"), repeats)

    return {
        "masks": timed(lambda: dense.masks_from_logits(logits, 3, size, 0.002)),
        "rle": timed(lambda: [scaled_mask_to_rle(m.region, m.size) for m in masks]),
        "sdk rle": timed(lambda: [mask2rle(m) for m in painted]),
        "count": len(masks),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


@contextlib.contextmanager
def image_server(images: list[bytes]) -> Iterator[str]:
    """Serve ``images`` as /0.jpg, /1.jpg, ... on loopback, as Label Studio serves its uploads:
    tasks then carry URLs (a few bytes through the queue) and the worker downloads the image."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images[int(self.path.strip("/").removesuffix(".jpg"))]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def serving(settings: Settings, count: int, redis_url: str) -> dict[str, dict[str, float]]:
    """Per-task latency through the queue and in-process, and from the cache."""
    with image_server([jpeg(image) for image in photos(count)]) as base:
        settings = dataclasses.replace(settings, allowed_hosts=("127.0.0.1",), allow_internal_hosts=True)
        tasks = [{"id": i, "data": {"image": f"{base}/{i}.jpg"}} for i in range(count)]
        return _serving(settings, tasks, redis_url)


def _serving(settings: Settings, tasks: list[dict], redis_url: str) -> dict[str, dict[str, float]]:
    config = (REPO / "label_config" / "voc_tags_and_masks.xml").read_text()

    def latencies(client, tasks) -> list[float]:
        out = []
        for task in tasks:
            started = time.perf_counter()
            response = client.post("/predict", json={"tasks": [task], "label_config": config})
            assert response.status_code == 200, response.get_json()
            out.append((time.perf_counter() - started) * 1000)
        return out

    inline = create_app(dataclasses.replace(settings, redis_url=None)).test_client()
    warm_up = [{**tasks[0], "id": tasks[0]["id"] + 1000}]  # a task not measured: the cache must not answer
    latencies(inline, warm_up)  # the model loads in the background on the first call
    embedded = latencies(inline, tasks)

    queued_settings = dataclasses.replace(settings, redis_url=redis_url)
    env = {**os.environ, **queued_settings.to_env()}
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    connection = redis.Redis.from_url(redis_url)
    finished = Queue(PREDICT_QUEUE, connection=connection, serializer=JSONSerializer).finished_job_registry
    try:
        client = create_app(queued_settings).test_client()
        deadline = time.monotonic() + 300
        while client.get("/health").get_json().get("workers", {}).get("count") != 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the benchmark's worker did not start")
            time.sleep(0.2)
        latencies(client, tasks[:1])
        queued, overhead = [], []
        for task in tasks:
            before = set(finished.get_job_ids())
            queued += latencies(client, [{**task, "id": task["id"] + 1000}])  # a new id: not cached
            (job_id,) = set(finished.get_job_ids()) - before
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
            overhead.append(queued[-1] - job.return_value()["timings_ms"]["total"])
        cached = latencies(client, [{**t, "id": t["id"] + 1000} for t in tasks])
    finally:
        processes.stop(worker)
    # The queue's cost per request: its latency minus the time the worker itself spent on the job
    # (exact per request, unlike queue minus in-process, which compares two noisy inference runs).
    return {
        "in-process": percentiles(embedded),
        "queue": percentiles(queued),
        "queue overhead": percentiles(overhead),
        "cached": percentiles(cached),
    }


def training(predictor: Predictor, steps: int, batch: int, size: int, train_steps: int) -> dict[str, float]:
    """Steps/s of the two training jobs on the shared VOC samples: CLIPSelf (fine-tunes the ViT;
    timed last, since it changes the predictor's weights) and the ZegCLIP head (ViT frozen)."""
    samples, classes = load_voc_folder(DATA / "voc-samples")
    corrections = [Correction(i, None, {}, s.mask, s.labels, s.image) for i, s in enumerate(samples)]
    text = predictor.text.classes([(c,) for c in classes])
    index = {c: i for i, c in enumerate(classes)}
    bundle = predictor.bundle

    def steps_per_second(run: Callable[[], object]) -> float:
        started = time.perf_counter()
        run()
        _sync(bundle.device)
        return steps / (time.perf_counter() - started)

    zegclip = steps_per_second(lambda: train_zegclip(bundle, samples, classes, steps=steps, size=size))
    cfg = CLIPSelfConfig(steps=steps, batch_size=batch, size=size)
    per_second = steps_per_second(
        lambda: train_clipself(bundle.visual, bundle.visual, corrections, text, index, bundle.mean, bundle.std, cfg)
    )
    return {"steps_per_s": per_second, "run_minutes": train_steps / per_second / 60, "batch": batch, "size": size,
            "zegclip_steps_per_s": zegclip, "zegclip_batch": ZEGCLIP_BATCH}  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name and the threads torch uses: CPU figures depend on both (and on AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return f"{name} ({torch.get_num_threads()} threads)"


def markdown(report: dict, command: str) -> str:
    c, p = report["ceiling"], report["pipeline"]
    flop = c["working GFLOP"]
    m = report["mask_output"]
    size = str(report["size"])
    lines = [
        "# Throughput",
        "",
        f"Produced by `{command}` on {report['date']}, device: {report['device']}, model: {report['model']},",
        f"batch {report['batch']}, working size {size} px short side at most, {report['precision']}, "
        f"at most {report['cwr_max_classes']} CWR crops per image, torch {torch.__version__}.",
        "",
        "| what | images/s | ratio to the encoder at the same size | GFLOP per image | ratio if compute-bound |",
        "|---|---|---|---|---|",
        f"| bare encoder, 224 x 224 | {c['224']:.2f} | | | |",
        f"| bare encoder, same photos and working sizes | {c['working']:.2f} | 1.00 | {flop:.1f} | 1.00 |",
    ]
    for name, row in (("tags", "prelabel tags"), ("tags+masks", "prelabel tags + masks"),
                      ("tags+masks, 2 crops", "prelabel tags + masks, at most 2 CWR crops")):  # fmt: skip
        lines.append(f"| {row} | {p[name]:.2f} | {p[name] / c['working']:.2f} | {p[name + ' GFLOP']:.1f} | "
                     f"{flop / p[name + ' GFLOP']:.2f} |")  # fmt: skip
    needed = TARGET_IMAGES_PER_S * p["tags+masks GFLOP"] / 1000
    lines += [
        "",
        f"{TARGET_IMAGES_PER_S} images/s of tags + masks at {p['tags+masks GFLOP']:.1f} GFLOP each need "
        f"{needed:.0f} TFLOP/s sustained: {needed / H100_BF16_TFLOPS:.0%} of an H100's dense bf16 peak "
        f"({H100_BF16_TFLOPS:.0f} TFLOP/s).",
        "",
        f"Tags + masks for one 512 x 384 photo: {p['one 512 px image s']:.2f} s. A 12-megapixel JPEG to model "
        f"input: {report['decoding']['reduced']:.0f} ms (decoded at a reduced scale; "
        f"{report['decoding']['full']:.0f} ms decoded in full). Its {m['count']} masks from the logits: "
        f"{m['masks']:.0f} ms, and {m['rle']:.0f} ms to encode them as brush RLE (the SDK's mask2rle: "
        f"{m['sdk rle']:.0f} ms).",
    ]
    if "serving" in report:
        s = report["serving"]
        lines += ["", "| one task per /predict | p50 ms | p95 ms |", "|---|---|---|"]
        lines += [f"| {k} | {v['p50']:.1f} | {v['p95']:.1f} |" for k, v in s.items()]
    if "training" in report:
        t = report["training"]
        lines += [
            "",
            f"CLIPSelf: {t['steps_per_s']:.2f} steps/s (batch {t['batch']}, {t['size']} px); a run of "
            f"{report['train_steps']} steps takes {t['run_minutes']:.1f} min, whatever the number of corrections.",
        ]
        if "zegclip_steps_per_s" in t:
            lines += ["", f"ZegCLIP head: {t['zegclip_steps_per_s']:.2f} steps/s (batch {t['zegclip_batch']}, "
                          f"{t['size']} px, the ViT frozen)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model, random weights")
    parser.add_argument("--checkpoint", help="a model directory instead (e.g. bench/models/toy-clip)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=448, help="working short side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=16, help="requests for the serving figures (0 = skip)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="a Redis database the run may flush")
    parser.add_argument("--train-steps", type=int, default=10, help="CLIPSelf steps to time (0 = skip)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    model_dir = Path(tempfile.mkdtemp())
    settings = Settings(
        model_name=args.model,
        model_pretrained="random" if not args.checkpoint else "openai",
        model_checkpoint=args.checkpoint,
        model_dir=model_dir,
        device=args.device,
        image_size=args.size,
        batch_size=args.batch,
    )
    predictor = Predictor(settings, load_clip(settings))
    device = predictor.bundle.device
    report: dict = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "model": predictor.bundle.description,
        "batch": args.batch,
        "size": args.size,
        "precision": str(predictor.bundle.precision).removeprefix("torch."),
        "cwr_max_classes": settings.cwr_max_classes,
        "train_steps": settings.train_steps,
    }  # fmt: skip
    images = photos(args.batch)
    report["ceiling"] = ceiling(predictor, images, args.batch, args.repeats)
    report["pipeline"] = pipeline(predictor, images, args.repeats)
    report["decoding"] = decoding(predictor, args.repeats)
    report["mask_output"] = mask_output(args.repeats)
    if args.tasks:
        redis.Redis.from_url(args.redis).flushdb()
        report["serving"] = serving(settings, args.tasks, args.redis)
        redis.Redis.from_url(args.redis).flushdb()
    if args.train_steps:
        report["training"] = training(predictor, args.train_steps, 4, args.size, settings.train_steps)
    command = "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(markdown(report, command), report, args.json, args.out)


if __name__ == "__main__":
    main()
