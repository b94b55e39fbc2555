"""End to end with the real Label Studio 1.23.2: a project from label_config/, real photos
uploaded (so the worker must fetch /data/upload/... with auth), prelabel connected as an ML
backend with basic auth, Retrieve Predictions on all tasks, every task checked. Once with a
legacy token and once with a personal access token. Then the same photos in cloud storage: a real
S3 server on loopback (moto), connected to Label Studio as the project's source storage."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import redis
import requests
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from rq import Queue

from backend.job_index import job_statuses
from bench import processes
from common import keys
from common.jobs import PREDICT_QUEUE
from common.settings import Settings, project_version
from tests.conftest import REPO, claim_redis_db, shared_data
from tests.labelstudio import VENV_BIN, Gate, LabelStudio, Prelabel, free_port

pytestmark = pytest.mark.e2e

PHOTOS = ["voc-samples/2011_000003.jpg", "voc-samples/120.png", "imagenet-samples/n02391049_zebra.JPEG"]
CONFIG = REPO / "label_config" / "voc_tags_and_masks.xml"
TOY_CLIP = REPO / "bench" / "models" / "toy-clip"
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"), free_port()).start()
    yield server
    server.stop()


@pytest.mark.parametrize("token_kind", ["legacy token", "personal access token"])
def test_retrieve_predictions_from_label_studio(label_studio, token_kind, tmp_path):
    token = label_studio.legacy_token if token_kind == "legacy token" else label_studio.personal_access_token()
    with claim_redis_db() as redis_url:
        settings = Settings(
            redis_url=redis_url,
            label_studio_url=label_studio.url,
            label_studio_api_key=token,
            basic_auth_user="labelstudio",
            basic_auth_pass="s3cret-pass",
            model_checkpoint=str(TOY_CLIP),
            image_size=64,
            background_words=("sky",),  # few background words, so the toy model draws masks
            distractors="none",  # ... and no distractors, with a low threshold: it tags the photos
            tag_min_score=0.01,
            mask_min_area=0.0,
            webhook_secret="hook-s3cret",
            adapt_every=len(PHOTOS),  # the few-shot learner runs once every task is corrected
            adapt_min_corrections=2,
            train_every=0,  # training starts with the button only
            train_min_corrections=2,
            train_steps=10,
            zegclip_min_masks=1,
            promotion_margin=1.0,  # the gate's own tests are in test_training.py; here, promote
        )
        prelabel = Prelabel(settings, tmp_path)
        try:
            prelabel.wait_ready()
            project = label_studio.create_project(f"prelabel e2e ({token_kind})", CONFIG.read_text())
            for photo in PHOTOS:
                label_studio.upload(project, shared_data() / photo)
            backend = label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass")
            assert backend["readable_state"] == "Connected", backend
            assert backend["model_version"] == settings.model_version

            assert label_studio.retrieve_predictions(project)["processed_items"] == len(PHOTOS)
            check_predictions(label_studio, project, settings.model_version)

            label_studio.retrieve_predictions(project)  # the same version: nothing new to store
            for task in label_studio.tasks(project):
                assert len(label_studio.predictions(task["id"])) == 1

            uid = learn_from_corrections(label_studio, project, backend["id"], prelabel)
            check_dashboard(prelabel, project, tmp_path)
            trained = prelabel.get(f"/versions?project={uid}")["active"]
            assert trained.startswith(settings.model_version + "+p")
            label_studio.retrieve_predictions(project)  # /setup now reports the trained version
            check_predictions(label_studio, project, trained)

            # An import is precomputed (TASKS_CREATED) and posted back without anyone asking.
            label_studio.upload(project, shared_data() / "voc-samples" / "2011_000006.jpg")
            new_task = max(task["id"] for task in label_studio.tasks(project))
            deadline = time.monotonic() + 120
            while not [p for p in label_studio.predictions(new_task) if p["model_version"] == trained]:
                assert time.monotonic() < deadline, prelabel.backend_log.read_text()[-3000:]
                time.sleep(1)
            assert len(label_studio.predictions(new_task)) == 1  # posted once
        finally:
            prelabel.stop()
    logs = prelabel.backend_log.read_text() + prelabel.worker_log.read_text() + prelabel.trainer_log.read_text()
    for secret in (token, "s3cret-pass", "hook-s3cret"):
        assert secret not in logs  # no secret in the logs
    if token_kind == "personal access token":
        assert "POST /api/token/refresh/" in label_studio.log_path.read_text()


def test_an_annotator_opening_a_task_is_served_ahead_of_a_bulk_selection(label_studio, tmp_path):
    """One worker; Retrieve Predictions on 12 tasks becomes 6 chunks; an annotator opens another
    task meanwhile: Label Studio asks for that one task, which goes ahead of the waiting chunks."""
    photos = sorted((shared_data() / "imagenet-samples").glob("*.JPEG"))[:13]
    with claim_redis_db() as redis_url:
        settings = Settings(
            redis_url=redis_url, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
            basic_auth_user="labelstudio", basic_auth_pass="s3cret-pass", model_checkpoint=str(TOY_CLIP),
            image_size=224, background_words=("sky",), distractors="none", tag_min_score=0.01, max_tasks_per_job=2,
        )  # fmt: skip
        prelabel = Prelabel(settings, tmp_path)
        try:
            prelabel.wait_ready()
            project = label_studio.create_project("prelabel bulk and interactive", CONFIG.read_text())
            for photo in photos:
                label_studio.upload(project, photo)
            label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass")
            *selection, opened = sorted(task["id"] for task in label_studio.stored_tasks(project))
            seconds: dict[str, float] = {}

            def retrieve() -> None:
                started = time.monotonic()
                assert label_studio.retrieve_predictions(project, selection)["processed_items"] == len(selection)
                seconds["selection"] = time.monotonic() - started

            bulk = threading.Thread(target=retrieve)
            bulk.start()
            queue = Queue(PREDICT_QUEUE, connection=redis.Redis.from_url(redis_url))
            deadline = time.monotonic() + 60
            while queue.count < 4:  # the selection's chunks wait behind the one the worker is on
                assert time.monotonic() < deadline and bulk.is_alive(), prelabel.backend_log.read_text()[-3000:]
                time.sleep(0.05)
            started = time.monotonic()
            label_studio.open_task(opened)
            seconds["opened"] = time.monotonic() - started
            waiting = queue.count
            bulk.join(timeout=120)
            assert len(label_studio.predictions(opened)) == 1
            assert waiting >= 2, "the opened task waited for the whole selection"
            assert seconds["opened"] < 0.5 * seconds["selection"], seconds
            (request,) = re.findall(
                r"request (request-\w+): 12 tasks in 6 predict jobs", prelabel.backend_log.read_text()
            )
            progress = prelabel.get(f"/jobs/{request}")
            assert progress["status"] == "finished" and progress["tasks_done"] == 12
            assert all(len(label_studio.predictions(task)) == 1 for task in selection)
        finally:
            prelabel.stop()


def one_job_per_photo(label_studio: LabelStudio, redis_url: str, label_studio_url: str | None = None) -> Settings:
    """The delivery tests' prelabel: the toy CLIP, one predict job per photo, reaching Label Studio
    at ``label_studio_url`` (by default its own)."""
    return Settings(
        redis_url=redis_url, label_studio_url=label_studio_url or label_studio.url,
        label_studio_api_key=label_studio.legacy_token, basic_auth_user="labelstudio",
        basic_auth_pass="s3cret-pass", webhook_secret="hook-s3cret", model_checkpoint=str(TOY_CLIP),
        image_size=64, background_words=("sky",), distractors="none", tag_min_score=0.01, max_tasks_per_job=1,
    )  # fmt: skip


def forget_backends(connection: redis.Redis) -> None:
    """What ALIVE_TTL seconds after a backend's crash do: its heartbeat key expires."""
    for key in connection.scan_iter(keys.backend_alive("*")):
        connection.delete(key)


def assert_each_posted_once(label_studio: LabelStudio, prelabel: Prelabel, settings: Settings,
                            tasks: list[int]) -> None:  # fmt: skip
    """Within 120 s every task holds exactly one prediction of prelabel's version."""
    deadline = time.monotonic() + 120
    while not all(label_studio.predictions(task) for task in tasks):
        assert time.monotonic() < deadline, prelabel.backend_log.read_text()[-3000:]
        time.sleep(1)
    for task in tasks:
        (prediction,) = label_studio.predictions(task)  # posted once
        assert prediction["model_version"] == settings.model_version and prediction["result"]


@contextlib.contextmanager
def imported_while_no_worker_runs(
    label_studio: LabelStudio, tmp_path: Path, title: str, label_studio_url: str | None = None
) -> Iterator[tuple[Settings, redis.Redis, Prelabel, list[int]]]:
    """prelabel (reaching Label Studio at ``label_studio_url``, by default its own) connected to a
    new project of one photo; then the worker stopped and the other photos imported, each a
    precompute job waiting in the queue as a delivery. Yields the settings, Redis, prelabel's
    services and the imported tasks' ids; stops prelabel after."""
    with claim_redis_db() as redis_url:
        settings = one_job_per_photo(label_studio, redis_url, label_studio_url)
        connection = redis.Redis.from_url(redis_url)
        prelabel = Prelabel(settings, tmp_path, services=("backend", "worker"))
        try:
            prelabel.wait_ready()
            project = label_studio.create_project(title, CONFIG.read_text())
            label_studio.upload(project, shared_data() / PHOTOS[0])
            label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass")
            label_studio.wait_for_webhook_secret(project)

            prelabel.terminate("worker")
            for photo in PHOTOS[1:]:
                label_studio.upload(project, shared_data() / photo)
            deadline = time.monotonic() + 30
            while connection.hlen(keys.DELIVERIES) < len(PHOTOS) - 1:  # one precompute job per imported photo
                assert time.monotonic() < deadline, prelabel.backend_log.read_text()[-3000:]
                time.sleep(0.2)
            imported = sorted(task["id"] for task in label_studio.tasks(project))[1:]
            assert all(label_studio.predictions(task) == [] for task in imported)
            yield settings, connection, prelabel, imported
        finally:
            prelabel.stop()


def test_an_imports_predictions_survive_a_backend_killed_while_its_jobs_wait(label_studio, tmp_path):
    """Photos imported while no worker runs wait in the queue as precompute jobs; the backend that
    queued them is killed (SIGKILL, nothing cleaned up); a new backend takes over their deliveries,
    and once a worker runs, every imported task gets its prediction in Label Studio, once."""
    with imported_while_no_worker_runs(label_studio, tmp_path, "prelabel restarted mid-import") as (
        settings, connection, prelabel, imported
    ):  # fmt: skip
        prelabel.kill("backend")
        forget_backends(connection)
        prelabel.start("backend")
        prelabel.start("worker")
        prelabel.wait_ready()
        assert_each_posted_once(label_studio, prelabel, settings, imported)
        assert connection.hlen(keys.DELIVERIES) == 0
        assert prelabel.backend_log.read_text().count("taken over from backend process") == len(imported)


def test_a_selections_predictions_survive_a_backend_killed_while_label_studio_waits(label_studio, tmp_path):
    """Retrieve Predictions on photos imported before prelabel was connected (nothing precomputed),
    while the worker is paused: the backend queues a job per photo and waits; it is killed
    (SIGKILL) before they run, so Label Studio's call fails. A new backend takes the request's jobs
    over as deliveries, and once the worker runs, every task gets its prediction in Label Studio,
    once."""
    with claim_redis_db() as redis_url:
        settings = one_job_per_photo(label_studio, redis_url)
        connection = redis.Redis.from_url(redis_url)
        prelabel = Prelabel(settings, tmp_path, services=("backend", "worker"))
        try:
            prelabel.wait_ready()
            project = label_studio.create_project("prelabel killed mid-selection", CONFIG.read_text())
            for photo in PHOTOS:
                label_studio.upload(project, shared_data() / photo)
            label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass")
            selection = sorted(task["id"] for task in label_studio.tasks(project))

            prelabel.pause("worker")

            def retrieve() -> None:
                with contextlib.suppress(Exception):  # the backend dies under it
                    label_studio.retrieve_predictions(project)

            bulk = threading.Thread(target=retrieve)
            bulk.start()
            deadline = time.monotonic() + 60
            while connection.hlen(keys.DELIVERIES) < len(selection):  # one job per photo, held by the request
                assert time.monotonic() < deadline and bulk.is_alive(), prelabel.backend_log.read_text()[-3000:]
                time.sleep(0.1)
            prelabel.kill("backend")
            bulk.join(timeout=120)
            assert not bulk.is_alive()
            assert all(label_studio.predictions(task) == [] for task in selection)  # the call got nothing
            forget_backends(connection)

            prelabel.resume("worker")
            prelabel.start("backend")
            prelabel.wait_ready()
            assert_each_posted_once(label_studio, prelabel, settings, selection)
            assert connection.hlen(keys.DELIVERIES) == 0
            assert prelabel.backend_log.read_text().count("taken over from backend process") == len(selection)
        finally:
            prelabel.stop()


def test_predictions_finished_while_label_studio_is_away_are_posted_when_it_returns(label_studio, tmp_path):
    """An import's precompute jobs finish while prelabel cannot reach Label Studio (a restart, a
    network cut: here a relay that refuses connections). Their deliveries keep what they could not
    post and try again later; once Label Studio answers, every task gets its prediction, once."""
    gate = Gate(label_studio.port)
    try:
        with imported_while_no_worker_runs(label_studio, tmp_path, "prelabel with Label Studio away", gate.url) as (
            settings, connection, prelabel, imported
        ):  # fmt: skip
            job_ids = [j.decode() for j in connection.hkeys(keys.DELIVERIES)]

            # A deploy: its deliveries wait in Redis for the next backend. It exits at once (docker
            # stop waits 10 s), no thread of it waiting on a job, and says it left.
            prelabel.terminate("backend", within=10)
            assert not list(connection.scan_iter(keys.backend_alive("*")))
            prelabel.start("worker")
            deadline = time.monotonic() + 120
            while job_statuses(connection, job_ids) != ["finished"] * len(job_ids):
                assert time.monotonic() < deadline, prelabel.worker_log.read_text()[-3000:]
                time.sleep(0.5)
            gate.shut()
            prelabel.start("backend")
            prelabel.wait_ready()
            deadline = time.monotonic() + 90
            while prelabel.backend_log.read_text().count("Label Studio is away; tried again in") < len(job_ids):
                assert time.monotonic() < deadline, prelabel.backend_log.read_text()[-3000:]
                time.sleep(0.5)
            assert all(label_studio.predictions(task) == [] for task in imported)

            gate.open()
            assert_each_posted_once(label_studio, prelabel, settings, imported)
            assert connection.hlen(keys.DELIVERIES) == 0
            # (reading a task to post to it makes Label Studio ask /predict, served from the cache: either way, once)
            retried = prelabel.backend_log.read_text().count("cached predictions posted to Label Studio at try")
            assert retried == len(job_ids)
    finally:
        gate.shut()


def learn_from_corrections(label_studio: LabelStudio, project: int, backend: int, prelabel: Prelabel) -> str:
    """Annotators fix every task (the webhooks reach prelabel with the secret header it added),
    then Start Training; returns the project's uid once the new version is active."""
    label_studio.wait_for_webhook_secret(project)
    for task in label_studio.tasks(project):
        (prediction,) = [p for p in label_studio.predictions(task["id"]) if p["result"]][:1]
        corrected = [dict(item) for item in prediction["result"]]
        corrected[0] = {**corrected[0], "value": {"choices": ["person"]}}  # a fixed tag; masks accepted
        label_studio.annotate(task["id"], corrected, lead_time=20.0 + task["id"])
    deadline = time.monotonic() + 30
    while not (reports := prelabel.get("/report")) or sum(
        row["corrections"] for rows in reports.values() for row in rows.values()
    ) < len(PHOTOS):
        assert time.monotonic() < deadline, f"corrections did not all reach prelabel: {reports}"
        time.sleep(0.5)
    (uid,) = reports  # every correction was compared with its prediction

    # The corrections' webhooks queued the few-shot learner on the predict worker: its version first.
    deadline = time.monotonic() + 120
    while not (details := prelabel.get(f"/versions?project={uid}").get("details")):
        assert time.monotonic() < deadline, prelabel.worker_log.read_text()[-3000:]
        time.sleep(1)
    # three photos: its gate reads one held-out task, and promotes only a candidate better on it
    assert [d["learner"] for d in details] == ["few-shot"] and details[0]["reason"], details

    label_studio.start_training(backend)
    deadline = time.monotonic() + 600
    while True:
        details = prelabel.get(f"/versions?project={uid}")["details"]
        if len(details) == 2:
            assert details[-1]["learner"] == "training" and details[-1]["promoted"], details
            return uid
        assert time.monotonic() < deadline, prelabel.trainer_log.read_text()[-3000:]
        time.sleep(2)


def check_dashboard(prelabel: Prelabel, project: int, tmp_path: Path) -> None:
    """The project manager's page in a real browser (Debian's headless Chromium), by Label Studio's
    plain project id: its figures and chart points are the corrections made through Label Studio.
    With PRELABEL_SCREENSHOTS set, its screenshot is kept there (README's docs/dashboard.png)."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    ((uid, rows),) = prelabel.get(f"/report?project={project}").items()
    corrections = sum(row["corrections"] for row in rows.values())
    user, password = prelabel.auth
    url = prelabel.url.replace("http://", f"http://{user}:{password}@") + f"/dashboard?project={project}"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2200"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"Project {uid}" in dom and f'<b id="corrections">{corrections}</b>' in dom, dom[-2000:]
    points = re.findall(r"<title>\d{4}-\d\d-\d\d, [^<]* accepted unchanged of (\d+) corrections</title>", dom)
    assert points and sum(int(n) for n in points) == corrections  # one point per day and version, all counted
    bars = re.findall(r"<title>[^<]* accepted unchanged of (\d+) corrections</title></rect>", dom)
    assert sum(int(n) for n in bars) == corrections  # one bar per version
    versions = prelabel.get(f"/versions?project={uid}")
    rollback = set(re.findall(r'data-version="([^"]+)" class="activate"', dom))
    assert rollback == set(versions["versions"]) - {versions["active"]}  # every version but the active one
    shots = Path(os.environ.get("PRELABEL_SCREENSHOTS") or tmp_path)
    shot = shots / "dashboard.png"
    subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    drawn = (np.abs(pixels.astype(int) - (0x00, 0x72, 0xB2)).sum(axis=1) < 30).sum()  # the charts' first colour
    assert drawn > 100, "the browser drew no chart"  # at least the points and legends of two charts
    assert f'<td>with a pre-label</td><td class="num">{corrections}</td>' in dom  # each one's lead time


def check_predictions(label_studio: LabelStudio, project: int, version: str, source: str = "/data/upload/") -> None:
    """Every task (its image at ``source``) holds one prediction from this version, with valid tags
    and masks that decode to the photo's size."""
    interface = LabelInterface(CONFIG.read_text())
    sizes = {}
    for photo in PHOTOS:
        with Image.open(shared_data() / photo) as image:
            sizes[Path(photo).name] = image.size
    tasks = label_studio.stored_tasks(project)
    assert len(tasks) == len(PHOTOS)
    masks = 0
    for task in tasks:
        assert task["data"]["image"].startswith(source)  # fetched by the worker through Label Studio, with auth
        (prediction,) = [p for p in label_studio.predictions(task["id"]) if p["model_version"] == version]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        items = prediction["result"]
        assert items[0]["type"] == "choices" and items[0]["value"]["choices"]
        width, height = next(size for name, size in sizes.items() if task["data"]["image"].endswith(name))
        for item in items[1:]:
            assert item["type"] == "brushlabels"
            assert (item["original_width"], item["original_height"]) == (width, height)
            mask = decode_rle(item["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
            assert mask.any() and set(np.unique(mask)) <= {0, 255}
            masks += 1
    assert masks > 0


def test_boxes_and_polygons_round_trip_through_label_studio(label_studio, tmp_path):
    """A boxes-and-polygons project: Label Studio stores the boxes and polygons prelabel draws, an
    annotator moves a box and keeps a polygon, and /report compares both per label."""
    config = (REPO / "label_config" / "voc_boxes_and_polygons.xml").read_text()
    with claim_redis_db() as redis_url:
        settings = Settings(redis_url=redis_url, label_studio_url=label_studio.url,
                            label_studio_api_key=label_studio.legacy_token, basic_auth_user="labelstudio",
                            basic_auth_pass="s3cret-pass", model_checkpoint=str(TOY_CLIP), image_size=64,
                            background_words=("sky",), distractors="none", tag_min_score=0.01,
                            mask_min_area=0.0, webhook_secret="hook-s3cret",
                            train_every=0)  # fmt: skip
        prelabel = Prelabel(settings, tmp_path)
        try:
            prelabel.wait_ready()
            project = label_studio.create_project("prelabel e2e (boxes and polygons)", config)
            for photo in PHOTOS:
                label_studio.upload(project, shared_data() / photo)
            backend = label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass")
            assert backend["readable_state"] == "Connected", backend
            assert label_studio.retrieve_predictions(project)["processed_items"] == len(PHOTOS)

            interface = LabelInterface(config)
            stored = {task["id"]: label_studio.predictions(task["id"]) for task in label_studio.tasks(project)}
            kinds = set()
            for (prediction,) in stored.values():
                assert interface.validate_prediction(prediction, return_errors=True) == []
                kinds |= {item["type"] for item in prediction["result"]}
            assert {"choices", "rectanglelabels", "polygonlabels"} <= kinds

            label_studio.wait_for_webhook_secret(project)
            corrected = 0
            for task_id, (prediction,) in stored.items():
                result = [dict(item) for item in prediction["result"]]
                for item in result:
                    if item["type"] == "rectanglelabels":  # the annotator narrows every box
                        item["value"] = {**item["value"], "width": item["value"]["width"] / 2}
                label_studio.annotate(task_id, result)
                corrected += 1
            deadline = time.monotonic() + 30
            while (
                not (rows := [row for rows in prelabel.get("/report").values() for row in rows.values()])
                or sum(row["corrections"] for row in rows) < corrected
            ):
                assert time.monotonic() < deadline, "corrections did not all reach prelabel"
                time.sleep(0.5)
            (row,) = rows
            assert row["polygon_iou"] and all(iou == 1.0 for iou in row["polygon_iou"].values())  # kept as drawn
            assert row["box_iou"] and all(0 < iou < 1.0 for iou in row["box_iou"].values())  # narrowed
            assert row["unchanged_share"] < 1.0
        finally:
            prelabel.stop()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A real S3 API on loopback: moto in server mode, as an S3-compatible store (MinIO) would be."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([VENV_BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(url, timeout=1)
            break
        except requests.RequestException:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
    yield url
    processes.stop(process)


@pytest.mark.parametrize("presign", [False, True], ids=["streamed by Label Studio", "presigned URLs"])
def test_images_in_s3_storage(label_studio, s3_server, presign, tmp_path):
    bucket = "photos-presigned" if presign else "photos-streamed"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    for photo in PHOTOS:
        s3.upload_file(str(shared_data() / photo), bucket, f"raw images/{Path(photo).name}")  # a space in the key

    with claim_redis_db() as redis_url:
        settings = Settings(
            redis_url=redis_url, label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
            basic_auth_user="labelstudio", basic_auth_pass="s3cret-pass", model_checkpoint=str(TOY_CLIP),
            image_size=64, background_words=("sky",), distractors="none", tag_min_score=0.01, mask_min_area=0.0,
            # the presigned URLs point at the S3 server on loopback
            storage_hosts=("127.0.0.1",), allow_internal_hosts=True, predict_timeout=60.0,
        )  # fmt: skip
        prelabel = Prelabel(settings, tmp_path)
        try:
            prelabel.wait_ready()
            project = label_studio.create_project(f"prelabel s3 ({bucket})", CONFIG.read_text())
            label_studio.connect_s3(project, bucket, "raw images/", s3_server, presign)
            stored = label_studio.stored_tasks(project)
            assert sorted(t["data"]["image"] for t in stored) == sorted(
                f"s3://{bucket}/raw images/{Path(p).name}" for p in PHOTOS
            )
            # the project's own settings, in the connection's Extra params
            own = {"TAG_MIN_SCORE": 0.02, "MASK_MIN_AREA": 0.0}
            backend = label_studio.connect_backend(project, prelabel.url, "labelstudio", "s3cret-pass", own)
            version = project_version(settings.model_version, {"TAG_MIN_SCORE": 0.02})  # MASK_MIN_AREA: as is
            assert backend["model_version"] == version != settings.model_version
            assert label_studio.retrieve_predictions(project)["processed_items"] == len(PHOTOS)
            check_predictions(label_studio, project, version, f"s3://{bucket}/")
        finally:
            prelabel.stop()
    assert backend["readable_state"] == "Connected"
    # Label Studio's access log: the worker asked its storage resolver for each object, which
    # streamed it (200) or redirected to a presigned URL on the S3 server (303)
    answers = {}
    for uri, status in re.findall(
        r'"GET /tasks/\d+/resolve/\?fileuri=(\S+) HTTP/1.1" (\d+)', label_studio.log_path.read_text()
    ):
        answers.setdefault(base64.urlsafe_b64decode(uri).decode(), set()).add(status)
    ours = {uri: status for uri, status in answers.items() if uri.startswith(f"s3://{bucket}/")}
    assert len(ours) == len(PHOTOS) and all(status == {"303" if presign else "200"} for status in ours.values())
    worker_log = prelabel.worker_log.read_text()
    assert "testing" not in worker_log and "Signature" not in worker_log  # no storage credential or signature
