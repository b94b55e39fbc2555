"""The ML backend protocol as Label Studio 1.23.2 speaks it, served in embedded mode (no Redis):
real photos, the tiny model, the fake Label Studio for image downloads."""

from __future__ import annotations

import base64

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.app import create_app
from backend.serving import MemoryCache

LABEL_CONFIG_TEMPLATE = """<View><Image name="image" value="$image"/>
  <Choices name="tags" toName="image" choice="multiple">{choices}</Choices></View>"""
PHOTOS = ["2011_000003.jpg", "2011_000006.jpg", "114.png", "n02391049_zebra.JPEG", "n04507155_umbrella.JPEG"]


@pytest.fixture
def app_for(make_settings, label_studio):
    def build(**overrides):
        overrides.setdefault("label_studio_url", label_studio.url)
        overrides.setdefault("label_studio_api_key", label_studio.legacy_token)
        return create_app(make_settings(**overrides))

    return build


@pytest.fixture
def client(app_for):
    return app_for().test_client()


def _tasks(label_studio, names: list[str]) -> list[dict]:
    return [{"id": 100 + i, "data": {"image": label_studio.upload_path(name)}} for i, name in enumerate(names)]


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_health_reports_up_with_model_state(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["model_class"] == "TagCLIP"
    assert body["mode"] == "embedded"
    assert body["model"]["state"] in ("loading", "ready")


def test_setup_returns_the_version_every_prediction_carries(client, voc_config, label_studio):
    setup = client.post("/setup", json={"project": "1.1700000000", "schema": voc_config, "hostname": "x",
                                        "access_token": "y", "extra_params": None})  # fmt: skip
    assert setup.status_code == 200
    version = setup.get_json()["model_version"]
    response = client.post("/predict", json={"tasks": _tasks(label_studio, PHOTOS[:2]), "label_config": voc_config})
    assert [r["model_version"] for r in response.get_json()["results"]] == [version, version]
    assert client.get("/versions").get_json() == {"versions": [version]}
    model = client.get("/health").get_json()["model"]  # what the operator sees once the model is warm
    assert model["state"] == "ready" and model["device"] == "cpu" and model["precision"] in ("float32", "bfloat16")


def test_predict_a_batch_of_real_photos_in_order_with_one_broken(client, voc_config, voc, label_studio):
    label_studio.files["broken.jpg"] = label_studio.files["2011_000003.jpg"][:3000]  # truncated JPEG
    names = PHOTOS[:3] + ["broken.jpg"] + PHOTOS[3:]
    tasks = _tasks(label_studio, names)
    tasks.insert(2, {"id": 99, "data": {"text": "no image field"}})
    payload = {"tasks": tasks, "project": "1.1700000000", "label_config": voc_config,
               "params": {"login": None, "password": None, "context": None}}  # fmt: skip

    response = client.post("/predict", json=payload)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    interface = LabelInterface(voc_config)
    for task, result in zip(tasks, results, strict=True):
        if task["id"] == 99 or task["data"].get("image", "").endswith("broken.jpg"):
            assert result == []  # nothing stored: Label Studio retries this task next time
            continue
        assert interface.validate_prediction(result, return_errors=True) == []
        (item,) = result["result"]
        assert item["id"] == f"tags-{task['id']}"  # one result per task, in the request's order
        assert item["value"]["choices"] and set(item["value"]["choices"]) <= set(voc["classes"][1:])
        assert 0.0 <= result["score"] <= 1.0

    again = client.post("/predict", json=payload).get_json()["results"]
    assert again == results  # the same model answers the same way


def test_single_choice_control_gets_exactly_one_label(client, label_studio):
    config = """<View><Image name="img" value="$photo"/>
      <Choices name="scene" toName="img"><Choice value="Indoor"/><Choice value="Outdoor"/></Choices></View>"""
    tasks = [{"id": 1, "data": {"photo": label_studio.upload_path(PHOTOS[0])}}]
    (result,) = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_json()["results"]
    (item,) = result["result"]
    assert item["from_name"] == "scene" and item["to_name"] == "img"
    assert len(item["value"]["choices"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "must be a JSON object"),
        ({"label_config": "<View/>"}, 400, "'tasks' must be a non-empty list"),
        ({"tasks": [{"data": {}}], "label_config": "<View/>"}, 400, "each with an integer 'id'"),
        ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image name='i' value='$i'/></View>"}, 400,
         "no control prelabel can predict"),
    ],
)  # fmt: skip
def test_bad_predict_requests_get_a_clear_400(client, body, status, message):
    if isinstance(body, str):
        response = client.post("/predict", data=body, content_type="application/json")
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status
    assert message in response.get_json()["error"]


def test_setup_refuses_an_unsupported_config_with_the_reason(client):
    response = client.post("/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert response.status_code == 400
    assert "no <Image> tag" in response.get_json()["error"]


def test_webhook_is_acknowledged_and_validated(client):
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    assert response.status_code == 200 and response.get_json()["action"] == "ANNOTATION_CREATED"
    assert client.post("/webhook", json={"annotation": {}}).status_code == 400


def test_embedded_mode_does_not_precompute_imports(client, voc_config, label_studio):
    """One job at a time in-process: an import must not queue work ahead of the annotators."""
    project = {"id": 8, "created_at": "2026-11-23T06:15:25Z", "label_config": voc_config}
    tasks = _tasks(label_studio, PHOTOS)
    answer = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks, "project": project})
    assert answer.status_code == 200 and answer.get_json()["status"] == "ignored"


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook", "/versions/v1/activate", "/jobs/j1/cancel"])
def test_state_changes_take_json_bodies_only(client, path):
    """A form or text body is what a page in a project manager's browser could send cross-site."""
    for kwargs in ({"data": {"project": "1.1"}}, {"data": '{"project": "1.1"}', "content_type": "text/plain"}):
        response = client.post(path, **kwargs)
        assert response.status_code == 415 and "application/json" in response.get_json()["error"]


def test_a_large_selection_runs_as_several_jobs_in_order(app_for, voc_config, label_studio):
    client = app_for(max_tasks_per_job=2).test_client()
    tasks = _tasks(label_studio, PHOTOS)  # 5 tasks: jobs of 2, 2 and 1
    results = client.post("/predict", json={"tasks": tasks, "label_config": voc_config}).get_json()["results"]
    assert [r["result"][0]["id"] for r in results] == [f"tags-{t['id']}" for t in tasks]


def test_without_auth_only_this_machines_names_are_answered(app_for, voc_config):
    """DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1, but its requests still
    say Host: evil.example."""
    client = app_for().test_client()
    body = {"project": "1.1", "schema": voc_config}
    for host in ("evil.example:9090", "evil.example", "192.168.1.20:9090"):
        response = client.post("/setup", json=body, headers={"Host": host})
        assert response.status_code == 400, host
    for host in ("localhost:9090", "127.0.0.1:9090", "localhost"):
        assert client.post("/setup", json=body, headers={"Host": host}).status_code == 200, host
    named = app_for(prelabel_url="http://prelabel.internal:9090").test_client()
    assert named.post("/setup", json=body, headers={"Host": "prelabel.internal:9090"}).status_code == 200
    authed = app_for(basic_auth_user="ls", basic_auth_pass="pw").test_client()  # behind auth, any name
    assert authed.post("/setup", json=body, headers={"Host": "backend:9090", **_basic("ls", "pw")}).status_code == 200


def test_unknown_route_is_a_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404 and "error" in response.get_json()


def test_basic_auth_guards_everything_but_health(app_for, voc_config, label_studio):
    client = app_for(basic_auth_user="ls", basic_auth_pass="s3cret").test_client()
    assert client.get("/health").status_code == 200
    body = {"tasks": _tasks(label_studio, PHOTOS[:1]), "label_config": voc_config}
    for method, path, kwargs in [
        ("post", "/predict", {"json": body}),
        ("post", "/setup", {"json": {"schema": voc_config}}),
        ("get", "/versions", {}),
        ("post", "/webhook", {"json": {"action": "PROJECT_UPDATED"}}),
    ]:
        call = getattr(client, method)
        assert call(path, **kwargs).status_code == 401, path
        assert call(path, headers=_basic("ls", "wrong"), **kwargs).status_code == 401, path
        assert call(path, headers=_basic("other", "s3cret"), **kwargs).status_code == 401, path
        assert call(path, headers=_basic("ls", "s3cret"), **kwargs).status_code == 200, path
    assert client.get("/versions").headers["WWW-Authenticate"].startswith("Basic")


def test_a_model_that_cannot_load_is_reported_not_crashed(app_for, voc_config, label_studio, tmp_path):
    client = app_for(model_checkpoint=str(tmp_path / "missing")).test_client()
    body = {"tasks": _tasks(label_studio, PHOTOS[:1]), "label_config": voc_config}
    predict = client.post("/predict", json=body)
    assert predict.status_code == 503
    assert "MODEL_CHECKPOINT" in predict.get_json()["error"]
    health = client.get("/health").get_json()
    assert health["model"]["state"] == "failed" and "does not exist" in health["model"]["error"]
    setup = client.post("/setup", json={"schema": voc_config})
    assert setup.status_code == 503 and "MODEL_CHECKPOINT" in setup.get_json()["error"]


def test_tags_and_masks_for_real_photos(app_for, label_studio):
    from pathlib import Path

    import numpy as np
    from label_studio_sdk.converter.brush import decode_rle

    config = (Path(__file__).parents[1] / "label_config" / "voc_tags_and_masks.xml").read_text()
    client = app_for(background_words=("sky",)).test_client()
    names = ["2011_000003.jpg", "n02391049_zebra.JPEG", "2011_000025.jpg"]
    response = client.post("/predict", json={"tasks": _tasks(label_studio, names), "label_config": config})
    assert response.status_code == 200
    interface = LabelInterface(config)
    sizes = {"2011_000003.jpg": (500, 338), "n02391049_zebra.JPEG": (500, 375), "2011_000025.jpg": (500, 375)}
    masks_seen = 0
    for name, prediction in zip(names, response.get_json()["results"], strict=True):
        assert interface.validate_prediction(prediction, return_errors=True) == []
        types = [item["type"] for item in prediction["result"]]
        assert types[0] == "choices"
        for item in prediction["result"][1:]:
            assert item["type"] == "brushlabels" and item["from_name"] == "mask"
            width, height = item["original_width"], item["original_height"]
            assert (width, height) == sizes[name]
            mask = decode_rle(item["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
            assert mask.any() and set(np.unique(mask)) <= {0, 255}
            masks_seen += 1
    assert masks_seen > 0


def test_five_hundred_and_unicode_labels(app_for, label_studio):
    client = app_for(tag_min_score=0.001).test_client()  # 500 near-uniform scores of the random model: ~0.002
    labels = [f"class {i}" for i in range(497)] + ["chat noir 🐈", "Straße", "猫"]
    config = LABEL_CONFIG_TEMPLATE.format(choices="".join(f'<Choice value="{v}"/>' for v in labels))
    tasks = _tasks(label_studio, PHOTOS[:2])
    response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.status_code == 200
    interface = LabelInterface(config)
    for prediction in response.get_json()["results"]:
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert set(prediction["result"][0]["value"]["choices"]) <= set(labels)
        assert prediction["result"][0]["value"]["choices"]


def test_embedded_mode_serves_repeated_tasks_from_its_cache(client, voc_config, label_studio):
    """The cache stands in front of either runner: once predicted, a task is answered again even
    when its image could no longer be downloaded (no job runs for it)."""
    label_studio.files["cached-copy.jpg"] = label_studio.files[PHOTOS[0]]
    tasks = [{"id": 900, "data": {"image": label_studio.upload_path("cached-copy.jpg")}}]
    body = {"tasks": tasks, "label_config": voc_config}
    first = client.post("/predict", json=body).get_json()["results"]
    del label_studio.files["cached-copy.jpg"]
    assert first[0]["result"] and client.post("/predict", json=body).get_json()["results"] == first
    fresh = [{"id": 901, "data": {"image": label_studio.upload_path("cached-copy.jpg")}}]
    assert client.post("/predict", json={"tasks": fresh, "label_config": voc_config}).get_json()["results"] == [[]]


def test_the_memory_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = MemoryCache(max_bytes=250)
    item = {"result": ["x" * 80]}  # ~95 bytes of JSON: two fit
    cache.put_many({"a": item, "b": item})
    assert cache.get_many(["a"]) == [item]  # a is now the most recently used
    cache.put_many({"c": item})
    assert cache.get_many(["a", "b", "c"]) == [item, None, item]


def test_a_projects_extra_params_are_its_own_settings_and_part_of_its_version(app_for, voc_config, label_studio):
    """Label Studio sends the model connection's "Extra params" with /setup only; /predict of that
    project then uses them, and its model version changes with them (so Label Studio re-predicts)."""
    client = app_for().test_client()  # TAG_MIN_SCORE=0.01: the random tiny model tags most labels

    def setup(project: str, extra_params: object):
        return client.post("/setup", json={"project": project, "schema": voc_config, "extra_params": extra_params})

    def predict(project: str) -> list[dict]:
        body = {"tasks": _tasks(label_studio, PHOTOS[:2]), "label_config": voc_config, "project": project}
        return client.post("/predict", json=body).get_json()["results"]

    base = setup("1.1700000000", None).get_json()["model_version"]
    strict = setup("2.1700000000", {"TAG_MIN_SCORE": 0.99, "mask_min_area": 0.01}).get_json()["model_version"]
    assert strict.startswith(base + "~") and strict != base
    assert (
        setup("2.1700000000", {"mask_min_area": "0.01", "tag_min_score": "0.99"}).get_json()["model_version"] == strict
    )

    loose, tight = predict("1.1700000000"), predict("2.1700000000")
    assert all(p["model_version"] == base and p["result"][0]["value"]["choices"] for p in loose)
    assert all(p["model_version"] == strict for p in tight)
    assert all(not any(item["type"] == "choices" for item in p["result"]) for p in tight)  # no label reaches 0.99

    # a value equal to the environment's is no setting of its own; no extra params: the environment's
    assert setup("2.1700000000", {"TAG_MIN_SCORE": 0.01}).get_json()["model_version"] == base
    assert setup("2.1700000000", None).get_json()["model_version"] == base
    assert [p["model_version"] for p in predict("2.1700000000")] == [base, base]


@pytest.mark.parametrize(
    ("extra_params", "message"),
    [
        (
            {"MODEL_CHECKPOINT": "/etc/passwd"},
            "'MODEL_CHECKPOINT' is not a per-project setting; these are: TAG_SCORES, TAG_RULE",
        ),
        ({"ALLOWED_HOSTS": "*"}, "'ALLOWED_HOSTS' is not a per-project setting"),
        ({"TAG_MIN_SCORE": 2}, "TAG_MIN_SCORE=2.0 must be a probability"),
        ({"DENSE_HEAD": "unet"}, "DENSE_HEAD=unet must be one of"),
        ({"DENSE_SLIDING": "sometimes"}, "DENSE_SLIDING='sometimes' is not a valid bool"),
        ({"CWR_MAX_CLASSES": 2.5}, "CWR_MAX_CLASSES='2.5' is not a valid int"),
        ({"CWR_MAX_CLASSES": 0}, "CWR_MAX_CLASSES must be between 1 and 6"),  # 0 would lift the service's limit
        ({"CWR_MAX_CLASSES": 10**6}, "CWR_MAX_CLASSES must be between 1 and 6"),
        ({"BACKGROUND_WORDS": {"sky": 1}}, "must be a number, true/false, a string or a list of words"),
        ({"BACKGROUND_WORDS": ["w"] * 201}, "at most 200 words"),
        ("TAG_MIN_SCORE=0.2", "must be a JSON object"),
    ],
)
def test_extra_params_label_studio_cannot_use_are_refused_with_the_reason(client, voc_config, extra_params, message):
    response = client.post("/setup", json={"project": "1.1700000000", "schema": voc_config,
                                           "extra_params": extra_params})  # fmt: skip
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_dense_pamr_refines_the_masks_along_the_photos_edges(app_for, label_studio):
    from pathlib import Path

    config = (Path(__file__).parents[1] / "label_config" / "voc_tags_and_masks.xml").read_text()
    tasks = _tasks(label_studio, ["2011_000003.jpg", "n02391049_zebra.JPEG"])
    interface = LabelInterface(config)

    def rles(**settings) -> list:
        results = app_for(background_words=("sky",), **settings).test_client().post(
            "/predict", json={"tasks": tasks, "label_config": config}).get_json()["results"]  # fmt: skip
        for prediction in results:
            assert interface.validate_prediction(prediction, return_errors=True) == []
        return [item["value"]["rle"] for p in results for item in p["result"] if item["type"] == "brushlabels"]

    plain, refined = rles(), rles(dense_pamr="true")
    assert plain and refined and plain != refined
    assert rles(dense_pamr="false") == plain  # auto, the default, leaves training-free masks unrefined
