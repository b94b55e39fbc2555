"""Learning from corrections: triggers and webhooks on real Redis and RQ, the training run's
core on real photos, the promotion gate, and workers switching versions between jobs."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import signal
import threading
import time

import flask
import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from backend.app import create_app
from backend.runner import QueueRunner
from backend.webhook_secret import SECRET_HEADER, project_secret
from common import keys
from common.errors import AnnotationError
from common.jobs import (
    TRAIN_FUNCTION,
    TRAIN_QUEUE,
    BrushControl,
    ChoicesControl,
    ClassLabel,
    ImageTask,
    PredictJob,
    TrainJob,
)
from common.labelstudio.brush import mask_to_rle
from common.labelstudio.config import parse_label_config
from common.versions import WEIGHTS_FILE, Registry
from tests.conftest import shared_data
from worker import tasks
from worker.cli import PrelabelWorker
from worker.loading import load_clip
from worker.model.zegclip import IGNORE, NO_CLASS
from worker.predictor import Predictor
from worker.progress import SHUTTING_DOWN, JobProgress, naming_shutdown
from worker.provider import ModelProvider
from worker.training.clipself import CLIPSelfConfig, _box_weights, train_clipself
from worker.training.corrections import (
    UNKNOWN_PIXEL,
    Correction,
    fetch_images,
    from_annotation,
    mark_boxes_unknown,
)
from worker.training.evaluate import GATED, evaluate, gate
from worker.training.loop import TrainingCancelled
from worker.training.run import run_training
from worker.training.zegclip import TrainingSample, schedule, target_map

PROJECT = {"id": 4, "created_at": "2026-11-23T06:15:25Z", "title": "photos", "label_config": ""}
UID = "4.1795414525"
CONFIG = """<View><Image name="image" value="$image"/>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="aeroplane"/><Choice value="bird"/><Choice value="bicycle"/><Choice value="bottle"/></Choices>
  <BrushLabels name="mask" toName="image">
    <Label value="aeroplane"/><Label value="bird"/><Label value="bicycle"/><Label value="bottle"/></BrushLabels>
</View>"""


def _project() -> dict:
    return {**PROJECT, "label_config": CONFIG}


def _annotation(annotation_id: int, task_id: int) -> dict:
    return {"id": annotation_id, "task": task_id, "project": 4, "result": [], "was_cancelled": False,
            "ground_truth": False, "completed_by": 1, "lead_time": 3.2}  # fmt: skip


@pytest.fixture
def queue_app(make_settings, redis_url):
    def build(**overrides):
        settings = make_settings(redis_url=redis_url, **overrides)
        return create_app(settings), settings

    return build


def test_start_training_queues_exactly_one_run(queue_app, redis_url):
    app, _ = queue_app()
    client = app.test_client()
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": _project()}).get_json()
    again = client.post("/webhook", json={"action": "START_TRAINING", "project": _project()}).get_json()
    assert first["status"] == "queued" and again["status"] == "already queued"
    assert first["job"] == again["job"]
    queue = Queue(TRAIN_QUEUE, connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer)
    assert queue.count == 1
    status = client.get(f"/jobs/{first['job']}").get_json()
    assert status["status"] == "queued" and status["description"].startswith(f"train project {UID}")
    payload = TrainJob.from_dict(queue.jobs[0].args[0])
    assert payload.project == UID and payload.trigger == "start_training"
    assert [c.from_name for c in payload.choices] == ["tags"] and [b.from_name for b in payload.brushes] == ["mask"]

    cancelled = client.post(f"/jobs/{first['job']}/cancel", json={}).get_json()
    assert cancelled["status"] == "canceled" and queue.count == 0
    third = client.post("/webhook", json={"action": "START_TRAINING", "project": _project()}).get_json()
    assert third["status"] == "queued" and third["job"] != first["job"]  # a cancelled run does not block


def test_every_n_corrections_start_one_run(queue_app, redis_url):
    app, _ = queue_app(train_every=3)
    client = app.test_client()
    events = [
        {"action": "ANNOTATION_CREATED", "annotation": _annotation(1, 10), "task": {"id": 10}, "project": _project()},
        {"action": "ANNOTATION_UPDATED", "annotation": _annotation(1, 10), "task": {"id": 10}, "project": _project()},
    ]
    assert [client.post("/webhook", json=e).get_json()["job"] for e in events] == [None, None]
    bulk = {"action": "ANNOTATIONS_CREATED", "annotation": [_annotation(i, 20 + i) for i in range(2, 7)],
            "task": [{"id": 20 + i} for i in range(2, 7)], "project": _project()}  # fmt: skip
    started = client.post("/webhook", json=bulk).get_json()
    assert started["status"] == "recorded" and started["job"] is not None
    more = client.post("/webhook", json={**events[0], "annotation": _annotation(9, 30)}).get_json()
    assert more["job"] is None  # the counter restarted with the run
    assert Queue(TRAIN_QUEUE, connection=redis.Redis.from_url(redis_url), serializer=JSONSerializer).count == 1


def test_concurrent_triggers_never_queue_two_runs(queue_app, redis_url):
    app, _ = queue_app()
    training = app.extensions["prelabel"].training
    spec = parse_label_config(CONFIG, max_labels=1000)
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(training.enqueue(UID, spec, "schedule")[0].id))
               for _ in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 8


def test_schedule_trains_only_projects_with_new_corrections(queue_app):
    app, _ = queue_app(train_every=0)
    client = app.test_client()
    quiet = {**_project(), "id": 5}
    client.post("/setup", json={"project": "5.1795414525", "schema": CONFIG})
    client.post(
        "/webhook", json={"action": "ANNOTATION_CREATED", "annotation": _annotation(1, 10), "project": _project()}
    )
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": quiet}).status_code == 200
    training = app.extensions["prelabel"].training
    started = training.sweep()
    assert len(started) == 1 and training.current(UID).id == started[0]
    assert training.current("5.1795414525") is None
    assert training.sweep() == []  # already queued: nothing new
    # One uid per Label Studio project id: made-up (or reset) creation times replace, never pile up.
    training.connection.hset(keys.PROJECTS, mapping={"5.1800000000": CONFIG, "5.1850000000": CONFIG})  # older backends
    training.connection.hdel(keys.PROJECT_UIDS, "5")
    for uid in ("5.1900000000", "5.1924992000"):
        assert client.post("/setup", json={"project": uid, "schema": CONFIG}).status_code == 200
    assert set(training.known_projects()) == {UID, "5.1924992000"}


def test_backends_naming_one_project_id_at_once_leave_one_uid(queue_app):
    """Two Label Studios (a reset one and the old one) naming project 6 with different creation
    times at once, through several backends: the read of the current uid and the write of the new
    one are one transaction, so exactly one uid of id 6 stays remembered, the index's own."""
    app, _ = queue_app(train_every=0)
    training = app.extensions["prelabel"].training
    start = threading.Barrier(8)

    def backend(n: int) -> None:
        start.wait()
        for i in range(60):
            training.remember_project(f"6.{1900000000 + 1000 * n + i}", CONFIG)

    threads = [threading.Thread(target=backend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    remembered = [uid for uid in training.known_projects() if uid.startswith("6.")]
    assert remembered == [training.connection.hget(keys.PROJECT_UIDS, "6").decode()]
    before = training.connection.hgetall(keys.PROJECTS)
    training.remember_project(remembered[0], CONFIG)  # the usual /setup: nothing to change
    assert training.connection.hgetall(keys.PROJECTS) == before


def test_forged_webhooks_are_refused(queue_app):
    app, _ = queue_app(basic_auth_user="ls", basic_auth_pass="pw", webhook_secret="hook-secret")
    client = app.test_client()
    event = {"action": "ANNOTATION_CREATED", "annotation": _annotation(1, 10), "project": _project()}
    ours = project_secret("hook-secret", 4)
    assert client.post("/webhook", json=event).status_code == 401
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: "guess"}).status_code == 401
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: "hook-secret"}).status_code == 401
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: ours}).status_code == 200
    # project 5's secret (seen by project 5's managers in its webhook settings) is worth nothing for project 4
    other = project_secret("hook-secret", 5)
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: other}).status_code == 401
    # the header names its project: project 4's digest under project 5's id, or alone, is refused
    digest = ours.split(":", 1)[1]
    assert ours.startswith("4:") and other.startswith("5:")
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: f"5:{digest}"}).status_code == 401
    assert client.post("/webhook", json=event, headers={SECRET_HEADER: digest}).status_code == 401
    basic = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert client.post("/webhook", json=event, headers=basic).status_code == 200  # START_TRAINING's way
    assert client.post("/predict", json={}, headers={SECRET_HEADER: ours}).status_code == 401


def test_a_webhook_without_its_secret_is_refused_before_its_body_is_parsed(queue_app, monkeypatch):
    """Parsing JSON costs about 30 times its size in memory: a request that proves nothing must not
    get that far."""
    app, _ = queue_app(webhook_secret="hook-secret")
    client = app.test_client()
    parsed = []
    real = flask.Request.get_json
    monkeypatch.setattr(flask.Request, "get_json", lambda self, *a, **k: parsed.append(1) or real(self, *a, **k))
    event = {"action": "ANNOTATION_CREATED", "annotation": _annotation(1, 10), "project": _project()}
    for header in ({}, {SECRET_HEADER: "guess"}, {SECRET_HEADER: project_secret("another-secret", 4)}):
        answer = client.post("/webhook", json=event, headers=header)
        assert answer.status_code == 401 and SECRET_HEADER in answer.get_json()["error"]
    assert parsed == []
    ours = {SECRET_HEADER: project_secret("hook-secret", 4)}
    assert client.post("/webhook", json=event, headers=ours).status_code == 200
    assert parsed


def test_gate_refuses_a_worse_model():
    assert gate({"tag_map": 0.8, "mask_miou": 0.5}, {"tag_map": 0.7, "mask_miou": 0.5}, 0.0)[0]
    ok, reason = gate({"tag_map": 0.8, "mask_miou": 0.4}, {"tag_map": 0.7, "mask_miou": 0.5}, 0.0)
    assert not ok and "mask_miou 0.400 < 0.500" in reason
    assert gate({"tag_map": 0.8, "mask_miou": 0.45}, {"tag_map": 0.7, "mask_miou": 0.5}, 0.1)[0]
    assert not gate({"tasks": 3}, {"tasks": 3}, 0.0)[0]  # nothing measurable: no promotion


# The training run itself, with corrections made from the VOC samples.

LABELS = ("aeroplane", "bird", "bicycle", "bottle")
JOB = TrainJob(
    UID,
    "",
    "image",
    parse_label_config(CONFIG, max_labels=1000).choices,
    parse_label_config(CONFIG, max_labels=1000).brushes,
    "test",
)


def _corrections(settings, project, image_key, choices, brushes, regions=(), limit=None) -> list[Correction]:
    """What pull_corrections would read from Label Studio, made from the VOC samples whose labels
    this project has: tags from their labels, masks from their class-id masks."""
    root = shared_data() / "voc-samples"
    index = json.loads((root / "index.json").read_text())
    out = []
    for name, entry in index["images"].items():
        if not set(entry["labels"]) <= set(LABELS):
            continue
        ids = np.asarray(Image.open(root / entry["mask"]))
        lookup = np.zeros(256, dtype=np.uint8)
        for label in entry["labels"]:
            lookup[index["classes"].index(label)] = LABELS.index(label) + 1
        url = "data:image/png;base64," + base64.b64encode((root / name).read_bytes()).decode()
        out.append(Correction(100 + len(out), url, {"tags": set(entry["labels"])}, lookup[ids], LABELS))
    return out


@pytest.fixture
def trainer(make_settings, redis_url):
    settings = make_settings(redis_url=redis_url, train_steps=6, train_lr=1e-4, train_min_corrections=4,
                             zegclip_min_masks=1, promotion_margin=1.0, mask_min_area=0.0)  # fmt: skip
    base = Predictor(settings, load_clip(settings))
    registry = Registry(settings.model_dir, settings.model_version, redis.Redis.from_url(redis_url))
    return settings, base, registry


def _noop(*args) -> None:
    pass


def test_a_training_run_saves_a_version_with_its_report_and_promotes_it(trainer):
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    stages = []
    summary = run_training(base, base, registry, job, lambda stage, *a: stages.append(stage), lambda: False,
                           collect=_corrections)  # fmt: skip
    assert summary["status"] == "promoted", summary
    assert registry.active(UID) == summary["version"] == f"{settings.model_version}+p4-v1"
    (info,) = registry.versions(UID)
    assert info.promoted and len(info.trained_on) + len(info.held_out) == summary["corrections"] >= 4
    assert set(info.held_out).isdisjoint(info.trained_on) and info.held_out
    assert {"tag_map", "tag_f1", "mask_miou"} <= set(info.metrics["candidate"]) and "active" in info.metrics
    registry.verify(info)  # the checksum matches the saved weights
    assert (registry.version_dir(UID, 1) / "zegclip" / "zegclip.safetensors").is_file()
    assert {"collecting corrections", "clipself", "zegclip", "evaluating"} <= set(stages)
    head = info.config["zegclip"]  # trained in passes over four fifths of its masks, its floor set on the rest
    assert head["calibration_masks"] >= 1 and head["train_masks"] + head["calibration_masks"] <= len(info.trained_on)
    assert head["steps"] == schedule(head["train_masks"], settings.zegclip_epochs, settings.zegclip_max_steps)
    assert info.config["clipself"]["dense_head"] == settings.dense_head


def test_the_gate_promotes_a_candidate_exactly_when_it_is_within_the_margin(trainer):
    """The same (seeded) run twice: with PROMOTION_MARGIN just under the candidate's worst shortfall
    against the active version it is refused and kept aside; just over it, it is promoted."""
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)

    def run(margin: float) -> dict:
        predictor = Predictor(dataclasses.replace(settings, promotion_margin=margin), base.bundle)
        return run_training(predictor, predictor, registry, job, _noop, lambda: False, collect=_corrections)

    probe = run(0.0)
    candidate, active = probe["metrics"]["candidate"], probe["metrics"]["active"]
    shortfall = max(active[m] - candidate[m] for m in GATED if m in candidate and m in active)
    registry.activate(UID, settings.model_version)

    refused = run(shortfall - 0.01)
    assert refused["metrics"] == probe["metrics"]  # seeded: the same candidate
    assert refused["status"] == "rejected" and "worse than the active version" in refused["reason"]
    assert registry.active(UID) == settings.model_version

    promoted = run(shortfall + 0.01)
    assert promoted["status"] == "promoted", promoted
    assert registry.active(UID) == promoted["version"]
    assert [v.promoted for v in registry.versions(UID)][1:] == [False, True]


def test_rollback_and_manual_promotion_through_the_http_route(trainer, redis_url, make_settings):
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    strict = Predictor(dataclasses.replace(settings, promotion_margin=-1.0), base.bundle)  # refuses any candidate
    kept = run_training(strict, strict, registry, job, _noop, lambda: False, collect=_corrections)["version"]
    assert registry.active(UID) == settings.model_version
    client = create_app(dataclasses.replace(settings, basic_auth_user="pm", basic_auth_pass="pw")).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"pm:pw").decode()}

    assert client.post(f"/versions/{kept}/activate", json={"project": UID}).status_code == 401
    by_query = client.post(f"/versions/{kept}/activate?project={UID}", headers=auth, json={})
    assert by_query.status_code == 400  # the project goes in the JSON body
    as_form = client.post(f"/versions/{kept}/activate", headers=auth, data={"project": UID})
    assert as_form.status_code == 415
    assert registry.active(UID) == settings.model_version

    answer = client.post(f"/versions/{kept}/activate", headers=auth, json={"project": UID})
    assert answer.status_code == 200 and registry.active(UID) == kept  # a manual promotion
    listed = client.get(f"/versions?project={UID}", headers=auth).get_json()
    assert listed["active"] == kept and [d["active"] for d in listed["details"]] == [True]

    (registry.version_dir(UID, 1) / WEIGHTS_FILE).write_bytes(b"bit rot")
    corrupt = client.post(f"/versions/{kept}/activate", headers=auth, json={"project": UID})
    assert corrupt.status_code == 400 and "corrupt" in corrupt.get_json()["error"]
    rollback = client.post(f"/versions/{settings.model_version}/activate", headers=auth, json={"project": UID})
    assert rollback.status_code == 200 and registry.active(UID) == settings.model_version


def test_a_run_reads_at_most_train_max_corrections(trainer):
    settings, base, registry = trainer
    asked = []

    def newest(*args, limit=None):
        asked.append(limit)
        return _corrections(*args, limit=limit)[:3]

    job = dataclasses.replace(JOB, model_version=settings.model_version)
    summary = run_training(base, base, registry, job, _noop, lambda: False, collect=newest)
    assert asked == [settings.train_max_corrections] and summary["status"] == "skipped"


def test_a_crash_or_a_cancel_leaves_the_active_version_alone(trainer):
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)

    def broken(*args, **kwargs):
        raise ConnectionError("Label Studio went away")

    with pytest.raises(ConnectionError):
        run_training(base, base, registry, job, _noop, lambda: False, collect=broken)
    with pytest.raises(TrainingCancelled):
        run_training(base, base, registry, job, _noop, lambda: True, collect=_corrections)
    assert registry.active(UID) == settings.model_version and registry.versions(UID) == []


@pytest.mark.parametrize("stage", ["clipself", "zegclip", "evaluating"])
def test_a_cancel_is_honoured_at_every_stage(trainer, stage):
    """The cancel arrives once the run has reached ``stage``: it stops there, saves nothing and
    leaves the active version alone."""
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    reached: list[str] = []

    def progress(name, step, steps, loss) -> None:
        reached.append(name)

    with pytest.raises(TrainingCancelled):
        run_training(base, base, registry, job, progress, lambda: stage in reached, collect=_corrections)
    assert reached[-1] == stage and reached.count(stage) <= 2  # stopped within a step of the request
    assert registry.active(UID) == settings.model_version and registry.versions(UID) == []


def test_too_few_corrections_train_nothing(trainer):
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)

    def two(*args, **kwargs) -> list[Correction]:
        return _corrections(*args, **kwargs)[:2]

    summary = run_training(base, base, registry, job, _noop, lambda: False, collect=two)
    assert summary["status"] == "skipped" and "training starts at 4" in summary["reason"]


def test_workers_switch_versions_between_jobs_without_dropping_one(trainer, redis_url):
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    trained = run_training(base, base, registry, job, _noop, lambda: False, collect=_corrections)["version"]

    runner = QueueRunner(settings)
    control = ChoicesControl("tags", "image", tuple(ClassLabel(n, (n,)) for n in LABELS), True)
    brush = BrushControl("mask", "image", tuple(ClassLabel(n, (n,)) for n in LABELS))
    url = _corrections(settings, UID, "image", (), ())[0].image_url
    jobs = [
        runner.submit(PredictJob(version, "image", (control,), (ImageTask(1, url),), (brush,), project=UID))
        for version in (settings.model_version, trained, settings.model_version, trained)
    ]
    provider = tasks.configure(settings)
    PrelabelWorker([runner.queue], connection=runner.connection, serializer=JSONSerializer).work(burst=True)
    results = [runner.wait(j, time.monotonic() + 5) for j in jobs]
    assert [r.model_version for r in results] == [settings.model_version, trained] * 2
    assert all(not t.error for r in results for t in r.tasks)
    assert results[0].tasks == results[2].tasks and results[1].tasks == results[3].tasks
    assert results[0].tasks != results[1].tasks  # the trained version answers differently
    assert isinstance(provider, ModelProvider) and trained in provider._versions  # loaded once, kept warm


def test_progress_reaches_the_job_status_and_cancel_reaches_the_job(queue_app, redis_url):
    from worker.progress import JobProgress

    app, _ = queue_app()
    client = app.test_client()
    job_id = client.post("/webhook", json={"action": "START_TRAINING", "project": _project()}).get_json()["job"]
    job = app.extensions["prelabel"].training.job(job_id)
    job_progress = JobProgress(job, "train", min_interval=0.0)
    job_progress.report("clipself", 0, 0, None)
    job_progress.report("clipself", 25, 100, 0.75)
    shown = client.get(f"/jobs/{job_id}").get_json()["progress"]
    assert shown["stage"] == "clipself" and shown["step"] == 25 and shown["steps"] == 100
    assert shown["loss"] == 0.75 and shown["eta_s"] >= 0

    assert not job_progress.should_stop()
    job.set_status("started")  # as a worker would
    assert client.post(f"/jobs/{job_id}/cancel", json={}).get_json()["status"] == "stopping"
    assert job_progress.should_stop()


def test_metrics_expose_queues_and_correction_figures(queue_app):
    app, _ = queue_app()
    client = app.test_client()
    state = app.extensions["prelabel"]
    box = {"from_name": "boxes", "to_name": "image", "type": "rectanglelabels",
           "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["bird"]}}  # fmt: skip
    v1 = state.registry.active(UID)  # per-label IoU is exported for the active version
    prediction = {"model_version": v1, "score": 0.5, "result": [{"from_name": "tags", "to_name": "image",
                  "type": "choices", "value": {"choices": ["bird"]}}, box]}  # fmt: skip
    state.feedback.remember_predictions(UID, {10: prediction})
    annotation = {**_annotation(1, 10), "result": prediction["result"]}
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation,
                                         "project": _project()}).get_json()["queued"] == 1  # fmt: skip
    assert state.feedback.report(UID)[UID] == {}  # compared later, off the request thread
    assert state.feedback.process_one(timeout=1)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'prelabel_queue_depth{queue="predict"} 0' in text
    assert f'prelabel_corrections{{project="{UID}",version="{v1}"}} 1' in text
    assert f'prelabel_accepted_unchanged_ratio{{project="{UID}",version="{v1}"}} 1.0' in text
    assert f'prelabel_box_iou{{label="bird",project="{UID}",version="{v1}"}} 1.0' in text
    assert f'prelabel_tags{{outcome="accepted",project="{UID}",version="{v1}"}} 1.0' in text
    assert (
        "# TYPE prelabel_predict_seconds histogram" in text and "# TYPE prelabel_queue_wait_seconds histogram" in text
    )

    assert client.get(f"/report?project={UID}").get_json()[UID][v1]["unchanged"] == 1

    # an update replaces its earlier comparison in the aggregates, a deletion takes it away
    state.feedback.record(UID, {**annotation, "result": prediction["result"][:1]})  # the box removed
    text = client.get("/metrics").get_data(as_text=True)
    assert f'prelabel_corrections{{project="{UID}",version="{v1}"}} 1.0' in text
    assert f'prelabel_accepted_unchanged_ratio{{project="{UID}",version="{v1}"}} 0.0' in text
    assert f'prelabel_box_iou{{label="bird",project="{UID}",version="{v1}"}} 0.0' in text
    state.feedback.forget(UID, [annotation["id"]])
    assert f'prelabel_corrections{{project="{UID}"' not in client.get("/metrics").get_data(as_text=True)


def test_a_corrupt_version_is_refused_by_the_worker_too(trainer):
    from common.errors import ModelUnavailable
    from common.versions import WEIGHTS_FILE

    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    version = run_training(base, base, registry, job, _noop, lambda: False, collect=_corrections)["version"]
    info = registry.get(UID, version)
    assert info.config["clipself"]["steps"] == 6 and info.config["from_version"] == settings.model_version
    (registry.version_dir(UID, info.number) / WEIGHTS_FILE).write_bytes(b"bit rot")
    provider = ModelProvider(settings)
    with pytest.raises(ModelUnavailable, match="corrupt"):
        provider.for_version(version, UID)
    assert provider.for_version(settings.model_version, UID) is provider.get()  # the base keeps serving


def _photo_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _brush(mask: np.ndarray, label: str) -> dict:
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "value": {"rle": mask_to_rle(mask), "brushlabels": [label]}}  # fmt: skip


def test_corrections_are_kept_at_training_size(make_settings):
    """A phone photo's correction costs what its working size does, image and mask alike."""
    settings = make_settings()  # IMAGE_SIZE=64
    spec = parse_label_config(CONFIG, max_labels=1000)
    mask = np.zeros((1200, 1600), dtype=bool)
    mask[:600, :800] = True  # the top-left quarter is a bird
    correction = from_annotation(7, _photo_uri((1600, 1200)), [_brush(mask, "bird")], spec.choices, spec.brushes,
                                 settings.max_image_pixels, settings.image_size)  # fmt: skip
    assert correction.size == (1600, 1200) and correction.mask.shape == (64, 85)
    assert (correction.mask[:32, :42] == 2).all() and not correction.mask[32:, :].any()
    (kept,) = fetch_images(Predictor(settings, load_clip(settings)), [correction], with_masks=True)
    assert kept.image.size == (85, 64) and kept.mask.shape == (64, 85)

    other = from_annotation(8, _photo_uri((1600, 1000)), [_brush(mask, "bird")], spec.choices, spec.brushes,
                            settings.max_image_pixels, settings.image_size)  # fmt: skip
    assert fetch_images(Predictor(settings, load_clip(settings)), [other], with_masks=True) == []  # 1600x1200 != x1000


def test_a_correction_whose_region_announces_too_many_pixels_is_refused(make_settings):
    settings = make_settings(max_image_pixels=1_000_000)
    spec = parse_label_config(CONFIG, max_labels=1000)
    region = _brush(np.ones((10, 10), dtype=bool), "bird")
    region.update(original_width=2000, original_height=1000)  # 2 MP over the 1 MP limit, before decoding
    with pytest.raises(AnnotationError, match="over MAX_IMAGE_PIXELS=1,000,000"):
        from_annotation(9, None, [region], spec.choices, spec.brushes, settings.max_image_pixels, settings.image_size)


def test_job_errors_are_shown_without_query_strings_or_userinfo(queue_app, redis_url):
    """A failure message that quotes a presigned URL keeps its signature out of GET /jobs/<id>."""
    app, _ = queue_app()
    connection = redis.Redis.from_url(redis_url)
    queue = Queue(TRAIN_QUEUE, connection=connection, serializer=JSONSerializer)
    job = queue.enqueue_call("int", args=("https://user:pw@bucket.s3.amazonaws.com/a.jpg?X-Amz-Signature=SECRET",))
    SimpleWorker([queue], connection=connection, serializer=JSONSerializer).work(burst=True)  # int() raises
    (line,) = app.test_client().get(f"/jobs/{job.id}").get_json()["error"]
    assert "https://bucket.s3.amazonaws.com/a.jpg" in line
    assert "SECRET" not in line and "user:pw" not in line


REGIONS_CONFIG = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="boxes" toName="image"><Label value="bird"/><Label value="cat"/></RectangleLabels>
  <PolygonLabels name="outlines" toName="image"><Label value="bird"/><Label value="cat"/></PolygonLabels>
</View>"""


def test_fetching_stops_at_its_share_of_the_time_limit_and_keeps_what_it_has(make_settings, caplog):
    settings = make_settings()
    predictor = Predictor(settings, load_clip(settings))
    corrections = [Correction(i, _photo_uri((96, 64)), {}) for i in range(3)]
    assert [c.task_id for c in fetch_images(predictor, corrections, with_masks=False, seconds=60)] == [0, 1, 2]
    with caplog.at_level(logging.WARNING, logger="worker.training.corrections"):
        assert fetch_images(predictor, corrections, with_masks=False, seconds=0) == []
    assert "0 of 3 corrections fetched (the newest), 0 usable; the older ones are left out" in caplog.text


def test_polygons_are_masks_and_boxes_are_weak_labels(make_settings):
    settings = make_settings()  # IMAGE_SIZE=64
    spec = parse_label_config(REGIONS_CONFIG, max_labels=1000)
    size = {"original_width": 1600, "original_height": 1200}
    polygon = {"from_name": "outlines", "type": "polygonlabels", **size,
               "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["cat"]}}  # fmt: skip
    box_value = {"x": 60, "y": 10, "width": 20, "height": 30, "rotation": 0, "rectanglelabels": ["bird"]}
    box = {"from_name": "boxes", "type": "rectanglelabels", **size, "value": box_value}
    correction = from_annotation(7, _photo_uri((1600, 1200)), [polygon, box], spec.choices, spec.brushes,
                                 settings.max_image_pixels, settings.image_size, spec.regions)  # fmt: skip
    assert correction.mask_labels == ("bird", "cat") and correction.mask.shape == (64, 85)
    cat = correction.mask == 2
    assert cat[:31, :41].all() and not cat[34:, :].any() and not cat[:, 44:].any()  # the top-left quarter
    assert not (correction.mask == 1).any()  # a box says where a bird is, not which pixels
    assert correction.boxes == [("bird", pytest.approx((0.6, 0.1, 0.8, 0.4)))]


def test_boxes_keep_their_control_s_labels_once(make_settings):
    settings = make_settings()
    spec = parse_label_config(REGIONS_CONFIG, max_labels=1000)
    value = {"x": 60, "y": 10, "width": 20, "height": 30, "rotation": 0, "rectanglelabels": ["bird", "dog", "bird"]}
    box = {"from_name": "boxes", "type": "rectanglelabels", "original_width": 1600, "original_height": 1200,
           "value": value}  # fmt: skip
    correction = from_annotation(7, None, [box, box], spec.choices, spec.brushes, settings.max_image_pixels,
                                 settings.image_size, spec.regions)  # fmt: skip
    assert correction.boxes == [("bird", pytest.approx((0.6, 0.1, 0.8, 0.4)))]  # no "dog": not a label of boxes


def test_a_label_past_the_254th_is_unknown_in_the_mask(make_settings):
    settings = make_settings()
    labels = "".join(f'<Label value="l{i}"/>' for i in range(300))
    config = f'<View><Image name="image" value="$image"/><PolygonLabels name="outlines" toName="image">{labels}' \
             "</PolygonLabels></View>"  # fmt: skip
    spec = parse_label_config(config, max_labels=1000)

    def polygon(label: str, x: int) -> dict:
        points = [[x, 0], [x + 40, 0], [x + 40, 90], [x, 90]]
        return {"from_name": "outlines", "type": "polygonlabels", "original_width": 1600, "original_height": 1200,
                "value": {"points": points, "polygonlabels": [label]}}  # fmt: skip

    correction = from_annotation(7, None, [polygon("l299", 0), polygon("l253", 50)], spec.choices, spec.brushes,
                                 settings.max_image_pixels, settings.image_size, spec.regions)  # fmt: skip
    assert correction.mask is not None and set(np.unique(correction.mask).tolist()) == {0, 254, UNKNOWN_PIXEL}
    assert correction.mask[5, 5] == UNKNOWN_PIXEL and correction.mask[5, -5] == 0
    assert len(correction.mask_labels) == 254  # what the mask can name: every reader's lookup fits
    sample = TrainingSample(Image.new("RGB", (1, 1)), correction.mask, correction.mask_labels)
    classes = [f"l{i}" for i in range(300)]
    assert set(np.unique(target_map(sample, classes)).tolist()) == {NO_CLASS, 253, IGNORE}


def test_boxes_steer_clipself_and_polygons_are_scored_as_masks(make_settings):
    weights = _box_weights((0.0, 0.25, 0.5, 1.0), (4, 4))
    assert weights.tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert _box_weights((0.1, 0.0, 0.35, 0.25), (4, 4))[0].tolist() == pytest.approx([0.6, 0.4, 0.0, 0.0])

    settings = make_settings(background_words=("sky",), mask_min_area=0.0)
    predictor = Predictor(settings, load_clip(settings))
    spec = parse_label_config(REGIONS_CONFIG, max_labels=1000)
    image = Image.open(io.BytesIO(base64.b64decode(_photo_uri((96, 64)).split(",")[1]))).convert("RGB")
    boxed = [Correction(i, None, {}, image=image, boxes=[("cat", (0.1, 0.1, 0.6, 0.7))]) for i in range(2)]
    text = predictor.text.classes([("bird",), ("cat",), ("sky",)])
    cfg = CLIPSelfConfig(steps=2, batch_size=2, lr=1e-3, size=64)
    args = (predictor.bundle.visual, predictor.bundle.visual)
    rest = (text, {"bird": 0, "cat": 1}, predictor.bundle.mean, predictor.bundle.std, cfg)
    with_boxes, _ = train_clipself(*args, boxed, *rest)
    without, _ = train_clipself(*args, [dataclasses.replace(c, boxes=[]) for c in boxed], *rest)
    assert any(not torch.equal(with_boxes[k], without[k]) for k in with_boxes)  # the boxes changed training

    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:32, :48] = 2
    scored = evaluate(predictor, [Correction(1, None, {}, mask, ("bird", "cat"), image)], (), (), spec.regions)
    assert "mask_miou" in scored and 0.0 <= scored["mask_miou"] <= 1.0  # polygon projects are gated on masks too


def test_a_polygon_project_trains_a_head_and_is_gated_on_its_masks(trainer):
    settings, base, registry = trainer
    labels = "".join(f'<Label value="{n}"/>' for n in LABELS)
    config = f'<View><Image name="image" value="$image"/><PolygonLabels name="outlines" toName="image">{labels}'
    config += "</PolygonLabels></View>"
    spec = parse_label_config(config, max_labels=1000)
    job = TrainJob(UID, settings.model_version, "image", (), (), "test", regions=spec.regions)
    summary = run_training(base, base, registry, job, _noop, lambda: False, collect=_corrections)
    info = registry.get(UID, summary["version"])
    assert "mask_miou" in info.metrics["candidate"] and info.config["zegclip"]["classes"] == list(LABELS)
    assert "zegclip/zegclip.safetensors" in info.files


def test_boxes_are_unknown_in_masks_and_a_boxes_only_project_is_gated_on_its_boxes(make_settings):
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[:, :5] = 1
    mark_boxes_unknown(mask, [("cat", (0.0, 0.0, 0.5, 0.5))])
    assert (mask[:5, :5] == 1).all() and (mask[:5, 5:10] == 255).all() and not mask[5:, 5:].any()

    settings = make_settings(background_words=("sky",), mask_min_area=0.0)
    predictor = Predictor(settings, load_clip(settings))
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="boxes" toName="image">'
    config += '<Label value="bird"/><Label value="cat"/></RectangleLabels></View>'
    spec = parse_label_config(config, max_labels=1000)
    image = Image.open(io.BytesIO(base64.b64decode(_photo_uri((96, 64)).split(",")[1]))).convert("RGB")
    corrections = [Correction(1, None, {}, image=image, boxes=[("cat", (0.0, 0.0, 1.0, 1.0))])]
    scored = evaluate(predictor, corrections, (), (), spec.regions)
    assert 0.0 <= scored["box_miou"] <= 1.0  # something to gate on
    assert gate(scored, scored, 0.0)[0]


def test_a_worker_asked_to_stop_ends_its_training_run_at_the_next_step(trainer, redis_url):
    """SIGTERM (a redeploy) while a run trains: RQ's warm shutdown waits for the job, so the run
    stops at its next step and says why, instead of being killed mid-step when the container's
    grace period ends (and found dead 90 s later)."""
    settings, base, registry = trainer
    job = dataclasses.replace(JOB, model_version=settings.model_version)
    connection = redis.Redis.from_url(redis_url)
    worker = PrelabelWorker([TRAIN_QUEUE], connection=connection, serializer=JSONSerializer)
    queued = Queue(TRAIN_QUEUE, connection=connection, serializer=JSONSerializer).enqueue_call(TRAIN_FUNCTION,
                                                                                              args=({},))  # fmt: skip
    job_progress = JobProgress(queued, "train")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    reached: list[str] = []

    def progress(name, step, steps, loss) -> None:
        reached.append(name)
        if name == "clipself" and reached.count(name) == 1:
            worker.set_state(WorkerStatus.BUSY)
            worker.request_stop(signal.SIGTERM, None)  # what RQ's SIGTERM handler runs

    try:
        with pytest.raises(TrainingCancelled, match="its worker was shut down"), naming_shutdown():
            run_training(base, base, registry, job, progress, job_progress.should_stop, collect=_corrections)
    finally:
        SHUTTING_DOWN.clear()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert reached.count("clipself") <= 2  # stopped within a step
    assert registry.active(UID) == settings.model_version and registry.versions(UID) == []
