"""Tried as an attacker would: a running backend, predict worker and training worker, a real Label
Studio 1.23.2, and a server of the attacker's on loopback that records every request it gets.

The deployment allows one extra image host, the attacker's (``ALLOWED_HOSTS=127.0.0.1`` with
``ALLOW_INTERNAL_HOSTS``), the setting under which the reported backslash URL used to hand the
attacker Label Studio's API key. Every case asserts a clear refusal; the module ends by checking
that no credential ever reached anything but Label Studio, that nothing accepted was lost and that
every process is still up and serving.
"""

from __future__ import annotations

import base64
import gzip
import io
import itertools
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from backend.webhook_secret import SECRET_HEADER, project_secret
from bench import processes
from common import keys
from common.labelstudio.brush import mask_to_rle
from common.labelstudio.config import parse_label_config
from common.projects import project_uid
from common.settings import Settings
from tests.conftest import REPO, claim_redis_db, shared_data
from tests.labelstudio import VENV_BIN, LabelStudio, Prelabel, free_port
from tests.lsfake import FakeLabelStudio, trickle, trickle_headers
from tests.test_images import scan_bomb
from worker.training.corrections import pull_corrections

pytestmark = pytest.mark.e2e

CONFIG = (REPO / "label_config" / "voc_tags_and_masks.xml").read_text()
TOY_CLIP = REPO / "bench" / "models" / "toy-clip"
PHOTO = "2011_000003.jpg"
USER, PASSWORD, WEBHOOK_SECRET = "labelstudio", "basic-s3cret-pass", "webhook-s3cret"
SIGNATURE = "SIGNATURE-SECRET-4a7f"
TASK_IDS = itertools.count(900_000)


@dataclass
class World:
    label_studio: LabelStudio
    prelabel: Prelabel
    settings: Settings
    attacker: FakeLabelStudio
    project: dict  # project A, connected to prelabel, as a webhook carries it
    uid: str
    good: dict  # a task of project A with an uploaded photo
    other_project: int  # project B, another team's, connected to nothing
    other_task: dict

    @property
    def names(self) -> dict[str, object]:
        return {"att": self.attacker.port, "ls": self.label_studio.port, "ls_url": self.label_studio.url,
                "upload": self.good["data"]["image"], "sig": SIGNATURE}  # fmt: skip

    def post(self, path: str, body: object, auth: bool = True, **kwargs) -> requests.Response:
        return requests.post(f"{self.prelabel.url}{path}", json=body, auth=(USER, PASSWORD) if auth else None,
                             timeout=100, **kwargs)  # fmt: skip

    def predict(self, tasks: list[dict]) -> list:
        response = self.post("/predict", {"tasks": tasks, "label_config": CONFIG, "project": self.uid})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def webhook(self, body: dict, project_id: int | None = None, **kwargs) -> requests.Response:
        pid = self.project["id"] if project_id is None else project_id
        headers = {SECRET_HEADER: project_secret(WEBHOOK_SECRET, pid)}
        return self.post("/webhook", body, auth=False, headers=headers, **kwargs)

    def logs(self) -> str:
        p = self.prelabel
        return p.backend_log.read_text() + p.worker_log.read_text() + p.trainer_log.read_text()


def _attacker_routes(attacker: FakeLabelStudio) -> None:
    """What a hostile image host serves."""

    def send(status: int, body: bytes, content_type: str = "image/png", **headers):
        return lambda handler: handler._send(status, body, content_type, **headers)

    def huge(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**10))
        handler.end_headers()

    pixels = io.BytesIO()
    Image.new("1", (3000, 2000)).save(pixels, "PNG")  # 6 MP, over this deployment's 5 MP
    eps = io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, "EPS")
    attacker.extra_routes.update({
        "/huge.jpg": huge,
        "/bomb.png": send(200, gzip.compress(b"\0" * 50_000_000), **{"Content-Encoding": "gzip"}),
        "/trickle.jpg": trickle,
        "/login": send(200, b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
        "/pixels.png": send(200, pixels.getvalue()),
        "/image.eps": send(200, eps.getvalue(), "application/postscript"),
        "/slow-headers.jpg": trickle_headers,
        "/bad-location": send(302, b"", Location="http://[::1"),
    })  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory, photos) -> Iterator[World]:
    label_studio = LabelStudio(tmp_path_factory.mktemp("label-studio"), free_port()).start()
    attacker = FakeLabelStudio(dict(photos)).start()
    _attacker_routes(attacker)
    try:
        with claim_redis_db() as redis_url:
            settings = Settings(
                redis_url=redis_url, label_studio_url=label_studio.url,
                label_studio_api_key=label_studio.legacy_token, basic_auth_user=USER, basic_auth_pass=PASSWORD,
                webhook_secret=WEBHOOK_SECRET, model_checkpoint=str(TOY_CLIP), image_size=64,
                allowed_hosts=("127.0.0.1",), allow_internal_hosts=True, fetch_timeout=3.0,
                max_image_bytes=2_000_000, max_image_pixels=5_000_000, train_every=0, distractors="none",
                tag_min_score=0.01,
                model_dir=tmp_path_factory.mktemp("models"),
            )  # fmt: skip
            prelabel = Prelabel(settings, tmp_path_factory.mktemp("prelabel"))
            try:
                prelabel.wait_ready()
                project = label_studio.create_project("team A", CONFIG)
                label_studio.upload(project, shared_data() / "voc-samples" / PHOTO)
                backend = label_studio.connect_backend(project, prelabel.url, USER, PASSWORD)
                assert backend["readable_state"] == "Connected", backend
                other = label_studio.create_project("team B", CONFIG)
                label_studio.upload(other, shared_data() / "voc-samples" / PHOTO)
                details = label_studio.api("GET", f"/api/projects/{project}")
                world = World(
                    label_studio, prelabel, settings, attacker,
                    project={"id": project, "created_at": details["created_at"], "label_config": CONFIG},
                    uid="", good=label_studio.tasks(project)[0], other_project=other,
                    other_task=label_studio.tasks(other)[0],
                )  # fmt: skip
                world.uid = project_uid(world.project)
                yield world
            finally:
                prelabel.stop()
    finally:
        attacker.stop()
        label_studio.stop()


def _corrupt_tiff() -> bytes:
    """A TIFF whose strip offsets are text: Pillow raises TypeError reading it."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "TIFF")
    return buffer.getvalue().replace(b"\x11\x01\x04\x00", b"\x11\x01\x02\x00")


# Image URLs in task data: each is refused with its reason; the good task in the same batch is served.
URL_CASES = [
    ("http://127.0.0.1:{att}\\@localhost:{ls}{upload}", "backslash, whitespace or control character"),
    ("http://127.0.0.1:{att}\\\\@localhost:{ls}{upload}", "backslash"),
    ("http://localhost:{ls}\\{upload}", "backslash"),
    ("http://localhost:{ls}{upload}\r\nX-Injected: 1", "control character"),
    ("http://localhost:{ls}{upload}\n", "control character"),
    ("http://localhost:{ls}/data/upload/1/a b.jpg", "whitespace"),
    (" http://localhost:{ls}{upload}", "whitespace"),
    ("http://admin:pw@localhost:{ls}{upload}", "user name or password"),
    ("http://@localhost:{ls}{upload}", "user name or password"),
    ("http://localhost:{ls}@127.0.0.1:{att}/raw/2011_000003.jpg", "user name or password"),
    ("file:///etc/passwd", "scheme 'file:'"),
    ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher:'"),
    ("s3://bucket/photo.jpg", "could not resolve the task's cloud storage URI"),  # no storage for it
    ("//127.0.0.1:{att}/raw/2011_000003.jpg", "scheme '\\(none\\):'"),
    ("/data/local-files/?d=../../etc/passwd", "'\\.\\.'"),
    ("/data/upload/1/%2e%2e/%2e%2e/api/projects", "'\\.\\.'"),
    ("/api/current-user/token", "outside the paths that serve task data"),
    ("{ls_url}/api/projects/", "outside the paths that serve task data"),
    ("http://169.254.169.254/latest/meta-data/", "not in ALLOWED_HOSTS|neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS"),
    ("http://10.0.0.1/a.jpg", "neither LABEL_STUDIO_URL nor in ALLOWED_HOSTS"),
    ("http://2130706433:{att}/raw/2011_000003.jpg", "four decimal numbers"),
    ("http://0x7f.1:{att}/raw/2011_000003.jpg", "four decimal numbers"),
    ("http://127.1:{att}/raw/2011_000003.jpg", "four decimal numbers"),
    ("http://[::ffff:127.0.0.1]:{att}/raw/2011_000003.jpg", "Refused image host"),
    ("http://[fe80::1%25lo]:{att}/raw/2011_000003.jpg", "zone id"),
    ("http://0.0.0.0:{att}/raw/2011_000003.jpg", "Refused image host"),
    ("http://127.0.0.1:{ls}{upload}", "HTTP 40[13]|web page"),  # Label Studio under another name: no key
    ("http://127.0.0.1:{att}/redirect?to={ls_url}{upload}", "never gets the API key|outside the paths"),
    ("http://127.0.0.1:{att}/redirect?to=http://169.254.169.254/", "Refused image host '169.254.169.254'"),
    ("http://127.0.0.1:{att}/redirect?to=file:///etc/passwd", "scheme 'file:'"),
    ("http://127.0.0.1:{att}/redirect?to=http://127.0.0.1:{att}%5C@localhost:{ls}{upload}", "backslash"),
    ("http://127.0.0.1:{att}/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/redirect%25253Fto%25253D/raw/x",
     "Too many redirects"),
    ("http://127.0.0.1:{att}/huge.jpg", "over MAX_IMAGE_BYTES"),
    ("http://127.0.0.1:{att}/bomb.png", "over MAX_IMAGE_BYTES"),
    ("http://127.0.0.1:{att}/trickle.jpg", "FETCH_TIMEOUT"),
    ("http://127.0.0.1:{att}/login", "web page"),
    ("http://127.0.0.1:{att}/pixels.png", "over MAX_IMAGE_PIXELS=5,000,000"),
    ("http://127.0.0.1:{att}/image.eps", "Not a recognised image format"),
    ("http://127.0.0.1:{att}/missing.jpg?X-Amz-Credential=AKIA&X-Amz-Signature={sig}", "HTTP 404"),
    ("http://127.0.0.1:{att}/slow-headers.jpg", "FETCH_TIMEOUT"),
    ("http://127.0.0.1:{att}/bad-location", "Unreadable redirect"),
    ("data:image/tiff;base64," + base64.b64encode(_corrupt_tiff()).decode(), "corrupt"),
    ("data:image/jpeg;base64," + base64.b64encode(scan_bomb()).decode(), "scans"),
    ("data:image/png,not-base64", "Only base64"),
    ("data:image/png;base64," + "A" * 3_000_000, "over MAX_IMAGE_BYTES"),
]  # fmt: skip


@pytest.mark.parametrize(("template", "reason"), URL_CASES, ids=[f"url{i:02d}" for i in range(len(URL_CASES))])
def test_a_hostile_image_url_is_refused_and_the_rest_of_the_batch_served(world, template, reason):
    task_id = next(TASK_IDS)
    seen = len(world.attacker.requests)
    refused, good = world.predict([{"id": task_id, "data": {"image": template.format(**world.names)}}, world.good])
    assert refused == [] and good["result"]  # nothing stored for it; the good task is served
    line = re.search(rf"task {task_id}: (.*)", world.prelabel.worker_log.read_text())
    assert line and re.search(reason, line.group(1)), line and line.group(1)
    assert all(auth is None for _, auth in world.attacker.requests[seen:])


@pytest.mark.parametrize("value", [12345, {"url": "http://127.0.0.1/x"}, ["a", "b"], None, ""])
def test_an_image_value_that_is_no_url_is_refused(world, value):
    task_id = next(TASK_IDS)
    refused, good = world.predict([{"id": task_id, "data": {"image": value}}, world.good])
    assert refused == [] and good["result"]
    assert f"task {task_id}: no prediction: The task has no image URL" in world.prelabel.backend_log.read_text()


# Request bodies: each answered with a status and a message that says what is wrong.
def _config_with(labels: int) -> str:
    choices = "".join(f"<Choice value='c{i}'/>" for i in range(labels))
    return f"<View><Image name='image' value='$image'/><Choices name='tags' toName='image'>{choices}</Choices></View>"


PAYLOADS = [
    ("/predict", b"{not json", "application/json", 400, "must be a JSON object"),
    ("/predict", b"[1, 2, 3]", "application/json", 400, "must be a JSON object"),
    ("/predict", b'{"tasks": []}', "text/plain", 415, "application/json"),
    ("/predict", {"tasks": "all", "label_config": CONFIG}, None, 400, "'tasks' must be a non-empty list"),
    ("/predict", {"tasks": [{"data": {}}], "label_config": CONFIG}, None, 400, "each with an integer 'id'"),
    ("/predict", {"tasks": [{"id": [1]}], "label_config": CONFIG}, None, 400, "each with an integer 'id'"),
    ("/predict", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deeply"),
    ("/predict", {"tasks": [{"id": 1}], "label_config": [CONFIG]}, None, 400, "must be an XML string, not list"),
    ("/setup", {"project": "1.1", "schema": {"View": {}}}, None, 400, "must be an XML string, not dict"),
    ("/predict", {"tasks": [{"id": 1}], "label_config": '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>'
     "<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='&a;'/></Choices></View>"},
     None, 400, "DTD or entities"),
    ("/predict", {"tasks": [{"id": 1}], "label_config": _config_with(40_000)}, None, 400, "over the 524,288"),
    ("/predict", {"tasks": [{"id": 1}], "label_config": _config_with(1001)}, None, 400, "MAX_LABELS=1,000"),
    ("/setup", {"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"}, None, 400, "no <Image> tag"),
    ("/setup", {"project": "1.1:*", "schema": CONFIG}, None, 400, "Expected a Label Studio project"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "content_type", "status", "message"), PAYLOADS,
                         ids=[f"payload{i:02d}" for i in range(len(PAYLOADS))])  # fmt: skip
def test_a_malformed_request_gets_a_clear_refusal(world, path, body, content_type, status, message):
    if isinstance(body, bytes):
        response = requests.post(f"{world.prelabel.url}{path}", data=body, auth=(USER, PASSWORD), timeout=60,
                                 headers={"Content-Type": content_type})  # fmt: skip
    else:
        response = world.post(path, body)
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["error"]


# Webhooks: forged, cross-project and carrying annotations that would exhaust memory.
def _region(width: int, height: int, rle: list[int] | None = None) -> dict:
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "value": {"format": "rle", "brushlabels": ["cat"],
            "rle": rle if rle is not None else mask_to_rle(np.ones((10, 10), bool))}}  # fmt: skip


def _annotation_event(world: World, *regions: dict) -> dict:
    annotation = {"id": next(TASK_IDS), "task": world.good["id"], "result": list(regions), "was_cancelled": False}
    return {"action": "ANNOTATION_CREATED", "annotation": annotation, "project": world.project}


WEBHOOKS = [
    ("no secret", lambda w: w.post("/webhook", {"action": "START_TRAINING", "project": w.project}, auth=False), 401),
    ("a guessed secret", lambda w: w.post("/webhook", {"action": "START_TRAINING", "project": w.project}, auth=False,
                                          headers={SECRET_HEADER: "0" * 64}), 401),
    ("WEBHOOK_SECRET itself", lambda w: w.post("/webhook", {"action": "START_TRAINING", "project": w.project},
                                               auth=False, headers={SECRET_HEADER: WEBHOOK_SECRET}), 401),
    ("project B's secret for A", lambda w: w.webhook({"action": "START_TRAINING", "project": w.project},
                                                     project_id=w.other_project), 401),
    ("A's secret, B's deletion", lambda w: w.webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}],
                                                      "project": {**w.project, "id": w.other_project}}), 401),
    ("RLE bomb", lambda w: w.webhook(_annotation_event(w, _region(50_000, 40_000))), 400),
    ("RLE of another size", lambda w: w.webhook(_annotation_event(w, _region(4000, 1000))), 400),
    ("RLE of strings", lambda w: w.webhook(_annotation_event(w, _region(10, 10, ["x"] * 20))), 400),
    ("RLE out of range", lambda w: w.webhook(_annotation_event(w, _region(10, 10, [0, 0, 1, 144, 999, 1, 2]))), 400),
    ("sizes not numbers", lambda w: w.webhook(_annotation_event(w, _region("10", None))), 400),  # type: ignore[arg-type]
    ("sizes of 2,200 digits", lambda w: w.webhook(_annotation_event(w, _region(10**2200, 10**2200))), 400),
    ("created in year 1", lambda w: w.webhook({"action": "START_TRAINING",
                                               "project": {**w.project, "created_at": "0001-01-01T00:00:00"}}), 400),
    ("no action", lambda w: w.webhook({"project": w.project}), 400),
    ("tasks not a list", lambda w: w.webhook({"action": "TASKS_CREATED", "tasks": 5, "project": w.project}), 400),
    ("deletions not a list", lambda w: w.webhook({"action": "ANNOTATIONS_DELETED", "annotations": 5,
                                                  "project": w.project}), 400),
    ("nested too deeply", lambda w: requests.post(f"{w.prelabel.url}/webhook", data=b"[" * 100_000, timeout=60,
                                                  headers={"Content-Type": "application/json",
                                                           SECRET_HEADER: project_secret(WEBHOOK_SECRET,
                                                                                         w.project["id"])}), 400),
    ("a project without config", lambda w: w.webhook({"action": "START_TRAINING",
                                                      "project": {**w.project, "label_config": ""}}), 400),
]  # fmt: skip


@pytest.mark.parametrize(("name", "send", "status"), WEBHOOKS, ids=[w[0] for w in WEBHOOKS])
def test_a_forged_or_hostile_webhook_is_refused(world, name, send, status):
    response = send(world)
    assert response.status_code == status, response.text[:300]
    assert response.json()["error"]
    queue = redis.Redis.from_url(world.settings.redis_url)
    assert queue.llen("rq:queue:train") == 0  # no training run was started by any of them


# State changes without the right credentials, and path tricks with them.
def test_state_changes_need_auth_and_json(world):
    version = world.settings.model_version
    for method, path, body in [
        ("post", f"/versions/{version}/activate", {"project": world.uid}),
        ("post", "/jobs/anything/cancel", {}),
        ("get", "/jobs/anything", None),
        ("get", "/report", None),
        ("get", f"/versions?project={world.uid}", None),
        ("post", "/setup", {"project": "77.1795414525", "schema": CONFIG}),
        ("post", "/predict", {"tasks": [world.good], "label_config": CONFIG}),
    ]:
        call = getattr(requests, method)
        kwargs = {"json": body} if body is not None else {}
        assert call(f"{world.prelabel.url}{path}", timeout=10, **kwargs).status_code == 401, path
        secret = {SECRET_HEADER: project_secret(WEBHOOK_SECRET, world.project["id"])}
        assert call(f"{world.prelabel.url}{path}", timeout=10, headers=secret, **kwargs).status_code == 401, path
    connection = redis.Redis.from_url(world.settings.redis_url)
    assert not connection.hexists(keys.PROJECTS, "77.1795414525")  # refused requests write nothing
    by_query = world.post(f"/versions/{version}/activate?project={world.uid}", {})
    assert by_query.status_code == 400
    traversal = world.post("/versions/..%2F..%2F..%2Fetc%2Fpasswd/activate", {"project": world.uid})
    assert traversal.status_code == 404
    odd_project = world.post(f"/versions/{version}/activate", {"project": "../../etc"})
    assert odd_project.status_code == 400
    assert not list(Path(world.settings.model_dir).glob("**/etc*"))


# Cross-project writes: a forged import must not put predictions into another team's project.
def test_a_forged_import_never_writes_into_another_project_or_over_another_image(world):
    ls = world.label_studio
    # Control: a real import into project A is precomputed and posted (the webhook carries A's secret).
    deadline = time.monotonic() + 30
    while not all(hook["headers"].get(SECRET_HEADER) for hook in ls.webhooks(world.project["id"])):
        assert time.monotonic() < deadline, "prelabel did not add its secret header to the webhook"
        ls.retrieve_predictions(world.project["id"])  # runs /setup, which schedules the header
        time.sleep(0.5)
    done = re.compile(r"background predict job \S+ done: 1 predictions cached")
    posted_before = len(done.findall(world.prelabel.backend_log.read_text()))
    ls.upload(world.project["id"], shared_data() / "voc-samples" / "2011_000006.jpg")
    imported = max(t["id"] for t in ls.tasks(world.project["id"]))
    deadline = time.monotonic() + 120
    # Reading the task to check it before posting makes Label Studio ask /predict for it (served
    # from the cache): then that is its prediction, and prelabel posts no second one.
    while not (len(done.findall(log := world.prelabel.backend_log.read_text())) > posted_before
               and ls.predictions(imported)):  # fmt: skip
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.5)
    assert len(ls.predictions(imported)) == 1
    # what was posted is remembered, so the correction that follows is compared with it
    served = redis.Redis.from_url(world.settings.redis_url)
    while not served.hexists(keys.served_predictions(world.uid), str(imported)):
        assert time.monotonic() < deadline, "the posted prediction was not remembered for the report"
        time.sleep(0.2)

    # Forged: project B's task, and project A's task with the attacker's picture instead of its own.
    # (Label Studio itself asks for predictions of the tasks it lists that have none: the imported
    # task has one already, so any new prediction on it would be the forged one.)
    foreign = {"id": world.other_task["id"], "data": world.other_task["data"]}
    swapped = {"id": imported, "data": {"image": f"http://127.0.0.1:{world.attacker.port}/raw/{PHOTO}"}}
    before = len(ls.predictions(imported))
    answer = world.webhook({"action": "TASKS_CREATED", "tasks": [foreign, swapped], "project": world.project})
    assert answer.status_code == 200, answer.text
    request = answer.json()["request"]
    progress = requests.get(f"{world.prelabel.url}/jobs/{request}", auth=(USER, PASSWORD), timeout=10).json()
    assert progress["tasks"] == 2 and progress["chunks"]["total"] == 1
    (job_id,) = progress["jobs"]
    deadline = time.monotonic() + 120
    while f"background predict job {job_id} done" not in (log := world.prelabel.backend_log.read_text()):
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.5)
    assert f"background predict job {job_id} done: 2 predictions cached, 0 posted" in log
    assert ls.predictions(world.other_task["id"]) == []
    assert len(ls.predictions(imported)) == before


def test_tasks_imported_into_label_studio_with_crafted_urls_get_no_prediction(world):
    """The reported attack, end to end: import tasks, press Retrieve Predictions."""
    ls = world.label_studio
    crafted = [
        f"http://127.0.0.1:{world.attacker.port}\\@localhost:{ls.port}{world.good['data']['image']}",
        f"http://user:pass@localhost:{ls.port}{world.good['data']['image']}",
        f"http://127.0.0.1:{world.attacker.port}/redirect?to={ls.url}{world.good['data']['image']}",
    ]
    ls.api("POST", f"/api/projects/{world.project['id']}/import", json=[{"image": url} for url in crafted])
    ls.retrieve_predictions(world.project["id"])
    tasks = {t["data"]["image"]: t["id"] for t in ls.tasks(world.project["id"])}
    for url in crafted:
        assert ls.predictions(tasks[url]) == [], url
    assert [p for p in ls.predictions(world.good["id"]) if p["result"]]  # the real photo has one


def test_a_secret_header_of_the_older_form_is_replaced_when_a_backend_starts(world, tmp_path):
    """Headers added before the header named its project (the HMAC alone) are refused; a backend
    that starts rewrites them for every project it knows, without waiting for Label Studio's /setup."""
    ls, pid = world.label_studio, world.project["id"]
    ours = project_secret(WEBHOOK_SECRET, pid)
    deadline = time.monotonic() + 30
    while not any(hook["headers"].get(SECRET_HEADER) == ours for hook in ls.webhooks(pid)):
        assert time.monotonic() < deadline, "prelabel did not add its secret header to the webhook"
        ls.retrieve_predictions(pid)  # runs /setup, which schedules the header
        time.sleep(0.5)
    (hook,) = [hook for hook in ls.webhooks(pid) if hook["headers"].get(SECRET_HEADER) == ours]
    older = ours.split(":", 1)[1]
    ls.api("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": {**hook["headers"], SECRET_HEADER: older}})
    assert world.post("/webhook", {"action": "PROJECT_UPDATED", "project": world.project}, auth=False,
                      headers={SECRET_HEADER: older}).status_code == 401  # fmt: skip
    env = {**os.environ, "PRELABEL_URL": world.prelabel.url, **world.settings.to_env()}
    log_path = tmp_path / "backend.log"
    with open(log_path, "w") as log:
        started = subprocess.Popen([VENV_BIN / "prelabel-backend", "--port", str(free_port())], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while ls.api("GET", f"/api/webhooks/{hook['id']}/")["headers"].get(SECRET_HEADER) != ours:
            assert time.monotonic() < deadline, f"the header was not replaced:\n{log_path.read_text()}"
            assert started.poll() is None, log_path.read_text()
            time.sleep(0.5)
    finally:
        processes.stop(started)
    assert ours not in log_path.read_text() and WEBHOOK_SECRET not in log_path.read_text()


def test_training_reads_around_annotations_label_studio_stores_but_prelabel_refuses(world, caplog):
    """Label Studio stores any annotation whose result is a list, and training reads annotations
    from its API, not from webhooks (a project may be connected after it was labelled): each one
    the webhook would refuse is left out with its reason, and the others are still read."""
    ls = world.label_studio
    project = ls.create_project("team C, labelled before prelabel", CONFIG)  # no webhook checks its annotations
    for name in (PHOTO, "2011_000006.jpg", "2011_000025.jpg"):
        ls.upload(project, shared_data() / "voc-samples" / name)
    good, odd_choices, bomb = sorted(task["id"] for task in ls.tasks(project))
    choices = {"from_name": "tags", "to_name": "image", "type": "choices"}
    ls.annotate(good, [{**choices, "value": {"choices": ["cat"]}}, _region(10, 10)])
    ls.annotate(odd_choices, [{**choices, "value": {"choices": "cat"}}])  # a string, not a list
    ls.annotate(bomb, [_region(50_000, 40_000)])  # 2 G pixels, over MAX_IMAGE_PIXELS
    uid = project_uid({"id": project, "created_at": ls.api("GET", f"/api/projects/{project}")["created_at"]})
    spec = parse_label_config(CONFIG, world.settings.max_labels)

    with caplog.at_level(logging.WARNING, logger="worker.training.corrections"):
        corrections = pull_corrections(world.settings, uid, spec.image_key, spec.choices, spec.brushes, spec.regions)
    left_out = {record.getMessage() for record in caplog.records}
    (read,) = corrections
    assert read.task_id == good and read.tags == {"tags": {"cat"}}
    assert read.mask is not None and set(np.unique(read.mask)) == {read.mask_labels.index("cat") + 1}  # all painted
    assert any(f"task {odd_choices} left out of training" in m and "list of at most" in m for m in left_out)
    assert any(f"task {bomb} left out of training" in m and "MAX_IMAGE_PIXELS" in m for m in left_out), left_out


def test_afterwards_no_credential_left_label_studio_and_everything_is_up(world):
    ls = world.label_studio
    assert world.attacker.requests, "the attacker's server was reached at all"
    assert all(auth is None for _, auth in world.attacker.requests)
    for headers in world.attacker.headers:
        assert ls.legacy_token not in json.dumps(headers) and PASSWORD not in json.dumps(headers)
    logs = world.logs()
    secrets = [ls.legacy_token, PASSWORD, WEBHOOK_SECRET, project_secret(WEBHOOK_SECRET, world.project["id"]),
               SIGNATURE, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]  # fmt: skip
    for secret in secrets:
        assert secret not in logs
    assert all(process.poll() is None for process in world.prelabel.processes.values())  # no process died
    health = requests.get(f"{world.prelabel.url}/health", timeout=5).json()
    assert health["status"] == "UP" and health["workers"]["count"] == 1
    fresh = {"id": next(TASK_IDS), "data": world.good["data"]}
    (served,) = world.predict([fresh])
    assert served["result"] and served["model_version"] == world.settings.model_version
