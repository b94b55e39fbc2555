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
def test_compose_file_validates():
    done = subprocess.run(
        ["docker-compose", "--env-file", ".env.example", "config", "--services"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {"label-studio", "redis", "backend", "worker", "trainer"}


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
