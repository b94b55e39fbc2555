"""Shared fixtures: a tiny CLIP on disk, real photos, a fake Label Studio file server, and an
empty database on the real Redis for each test that needs one."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.settings import Settings
from tests.lsfake import FakeLabelStudio
from tests.tiny import save_tiny_clip

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PRELABEL_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
REDIS_SERVER = os.environ.get("PRELABEL_TEST_REDIS", "redis://127.0.0.1:6379")
_CLAIM_PREFIX = "prelabel:test-claim:"


def shared_data() -> Path:
    if not (SHARED_DATA / "voc-samples" / "index.json").is_file():
        pytest.fail(f"Test photos not found at {SHARED_DATA}: check out ../shared next to the repo "
                    "or set PRELABEL_SHARED_DATA.")  # fmt: skip
    return SHARED_DATA


@pytest.fixture(scope="session")
def voc() -> dict:
    """The VOC samples index: ``classes`` and, per image, its mask file and labels."""
    return json.loads((shared_data() / "voc-samples" / "index.json").read_text())


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photographs by file name (VOC and ImageNet samples)."""
    root = shared_data()
    files = sorted((root / "voc-samples").glob("*.jpg")) + sorted((root / "voc-samples").glob("[0-9]*.png"))
    files += sorted((root / "imagenet-samples").glob("*.JPEG"))
    return {p.name: p.read_bytes() for p in files if not p.name.endswith("_mask.png")}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture
def make_settings(tiny_checkpoint: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for the tiny model at a small working size; keyword arguments override. The tiny
    model's weights are random, so its scores are near uniform: without distractors and with a
    low threshold it tags most labels, which the plumbing tests need (the decision rule and the
    distractors are tested on their own and with the trained toy CLIP)."""

    def build(**overrides) -> Settings:
        values = {
            "model_checkpoint": str(tiny_checkpoint),
            "model_dir": tmp_path / "model-dir",
            "image_size": 64,
            "batch_size": 4,
            "predict_timeout": 60.0,
            "distractors": "none",
            "tag_min_score": 0.01,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def label_studio(photos: dict[str, bytes]) -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(dict(photos)).start()
    yield server
    server.stop()


@contextlib.contextmanager
def claim_redis_db() -> Iterator[str]:
    """A Redis database of our own on the real server: the first empty one, claimed, flushed after.

    The claim is a key in database 0 (with an expiry), not in the claimed database: the benchmarks
    a test runs flush their database, and a claim kept there would let a concurrent run take it.
    """
    try:
        claims = redis.Redis.from_url(f"{REDIS_SERVER}/0")
        claims.ping()
    except redis.exceptions.ConnectionError as e:
        pytest.fail(f"These tests need a Redis server at {REDIS_SERVER} (scripts/test starts one): {e}")
    for db in range(15, 0, -1):
        claim = f"{_CLAIM_PREFIX}{db}"
        if not claims.set(claim, os.getpid(), nx=True, ex=6 * 3600):
            continue
        client = redis.Redis.from_url(f"{REDIS_SERVER}/{db}")
        if client.dbsize() != 0:  # someone else's data: leave it alone
            claims.delete(claim)
            continue
        try:
            yield f"{REDIS_SERVER}/{db}"
        finally:
            client.flushdb()
            claims.delete(claim)
        return
    pytest.fail(f"No empty Redis database on {REDIS_SERVER} (databases 1-15 are all in use).")


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claim_redis_db() as url:
        yield url


def settings_env(settings: Settings) -> dict[str, str]:
    return settings.to_env()


LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="tags" toName="image" choice="multiple">
    {choices}
  </Choices>
</View>"""


@pytest.fixture(scope="session")
def voc_config(voc: dict) -> str:
    """A multi-label Choices config over the 20 VOC classes."""
    return LABEL_CONFIG.format(choices="".join(f'<Choice value="{c}"/>' for c in voc["classes"][1:]))
