"""The deployment files: the compose file validates and speaks the settings' variable names."""

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from common.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_validates(tmp_path):
    done = subprocess.run(
        ["docker-compose", "--env-file", ".env.example", "config", "--services"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    services = {"label-studio", "redis", "backend", "worker", "trainer", "prometheus", "grafana"}
    assert set(done.stdout.split()) == services  # the last two in the "monitoring" profile
    # an .env from before the monitoring profile (no GRAFANA_ADMIN_PASSWORD) still starts the stack
    older = tmp_path / ".env"
    lines = (REPO / ".env.example").read_text().splitlines(keepends=True)
    older.write_text("".join(line for line in lines if not line.startswith("GRAFANA_ADMIN_PASSWORD")))
    done = subprocess.run(["docker-compose", "--env-file", str(older), "config", "--services"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_compose_sets_only_variables_prelabel_reads():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    known = {f.metadata["env"] for f in fields(Settings)}
    for service in ("backend", "worker", "trainer"):
        names = set(compose["services"][service]["environment"])
        assert names <= known, names - known
    gpus = []
    for service in ("worker", "trainer"):
        (device,) = compose["services"][service]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "count" not in device
        gpus.append(device["device_ids"])
        command = compose["services"][service]["command"]
        assert compose["services"][service]["healthcheck"]["test"] == ["CMD", *command, "--check"]
    assert gpus == [["${PREDICT_GPU:-0}"], ["${TRAIN_GPU:-1}"]]  # each its own GPU by default
    assert compose["services"]["trainer"]["command"] == ["prelabel-worker", "train"]


def test_the_monitoring_profile_scrapes_the_backend_and_its_dashboard_reads_what_it_exports(
    make_settings, redis_url
):  # fmt: skip
    """Prometheus scrapes /metrics with the backend's basic auth; Grafana's provisioned data source
    is that Prometheus; every metric the Grafana dashboard queries is one the backend exports."""
    import json
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from backend.app import create_app

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert compose["prometheus"]["profiles"] == compose["grafana"]["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    ((job,),) = [scrape]
    assert job["metrics_path"] == "/metrics" and job["static_configs"] == [{"targets": ["backend:9090"]}]
    command = compose["prometheus"]["command"][0]
    for variable, path in (("BASIC_AUTH_USER", "username_file"), ("BASIC_AUTH_PASS", "password_file")):
        assert f'printf %s "$${variable}" > {job["basic_auth"][path]}' in command
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]

    grafana = REPO / "deploy" / "grafana"
    (source,) = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((grafana / "provisioning" / "dashboards" / "prelabel.yml").read_text())["providers"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in compose["grafana"]["volumes"]
    dashboard = json.loads((grafana / "dashboards" / "prelabel.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert all(t["datasource"]["uid"] == source["uid"] for t in targets)

    app = create_app(make_settings(redis_url=redis_url))
    feedback = app.extensions["prelabel"].feedback
    prediction = {
        "model_version": "v1",
        "result": [{"type": "choices", "from_name": "tags", "value": {"choices": ["a"]}}],
    }
    feedback.remember_predictions("1.1", {1: prediction})
    feedback.record("1.1", {"id": 1, "task": 1, "result": prediction["result"]})
    exported = {sample.name for family in text_string_to_metric_families(
        app.test_client().get("/metrics").get_data(as_text=True)) for sample in family.samples}  # fmt: skip
    exported |= {
        "prelabel_mask_iou",
        "prelabel_box_iou",
        "prelabel_polygon_iou",
        "prelabel_worker_gpu_memory_bytes",
    }  # with regions / GPU workers
    queried = {name for t in targets + [dashboard["templating"]["list"][0]["query"]]
               for name in re.findall(r"\bprelabel_[a-z_]+", json.dumps(t))}  # fmt: skip
    assert queried and queried <= exported, queried - exported
