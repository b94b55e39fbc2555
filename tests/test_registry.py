"""Versions on disk and in Redis: listing, activation, rollback, and corrupt weights refused."""

from __future__ import annotations

import pytest
import redis

from common.errors import BadRequest, NotFound
from common.projects import project_id, project_uid
from common.versions import WEIGHTS_FILE, Registry, VersionInfo, file_checksum

PROJECT = "3.1795414525"
BASE = "prelabel-tiny-abc123"


def _add_version(registry: Registry, payload: bytes = b"weights") -> VersionInfo:
    return registry.add(PROJECT, lambda directory: (directory / WEIGHTS_FILE).write_bytes(payload), trained_on=[1, 2])


def test_project_uids_are_the_same_from_setup_and_from_webhooks():
    assert project_uid("3.1795414525") == "3.1795414525"
    webhook_project = {"id": 3, "created_at": "2026-11-23T06:15:25.123456Z", "title": "x"}
    assert project_uid(webhook_project) == "3.1795414525"
    assert project_id("3.1795414525") == 3
    with pytest.raises(BadRequest):
        project_uid({"title": "no id"})
    for created_at in ("0001-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "not a date", "9" * 5000):
        with pytest.raises(BadRequest, match="created_at|positive"):
            project_uid({"id": 3, "created_at": created_at})
    with pytest.raises(BadRequest):
        project_uid({"id": True, "created_at": "2026-11-23T06:15:25Z"})
    with pytest.raises(BadRequest, match="positive"):
        project_uid({"id": 10**30, "created_at": "2026-11-23T06:15:25Z"})
    for uid in ("\u0661\u0662.3", "1" * 19 + ".3", "3.1795414525\n"):  # Arabic-Indic digits, too long, a newline
        with pytest.raises(BadRequest):
            project_id(uid)


def test_base_until_a_version_is_activated_then_rollback(tmp_path, redis_url):
    connection = redis.Redis.from_url(redis_url)
    registry = Registry(tmp_path, BASE, connection)
    assert registry.active(PROJECT) == BASE and registry.active(None) == BASE
    v1, v2 = _add_version(registry), _add_version(registry, b"other")
    assert [v.version for v in registry.versions(PROJECT)] == [v1.version, v2.version]
    assert v2.version == f"{BASE}+p3-v2" and registry.next_number(PROJECT) == 3

    registry.activate(PROJECT, v2.version)
    assert registry.active(PROJECT) == v2.version
    assert Registry(tmp_path, BASE).active(PROJECT) == v2.version  # on disk too, without Redis
    registry.activate(PROJECT, v1.version)  # rollback
    assert registry.active(PROJECT) == v1.version
    registry.activate(PROJECT, BASE)
    assert registry.active(PROJECT) == BASE


def test_unknown_and_corrupt_versions_are_refused_and_the_active_one_stays(tmp_path, redis_url):
    registry = Registry(tmp_path, BASE, redis.Redis.from_url(redis_url))
    v1, v2 = _add_version(registry), _add_version(registry)
    registry.activate(PROJECT, v1.version)
    (registry.version_dir(PROJECT, 2) / WEIGHTS_FILE).write_bytes(b"bit rot")
    with pytest.raises(BadRequest, match="corrupt"):
        registry.activate(PROJECT, v2.version)
    with pytest.raises(NotFound):
        registry.activate(PROJECT, "nope")
    assert registry.active(PROJECT) == v1.version


def test_versions_of_another_base_are_not_offered(tmp_path):
    old = Registry(tmp_path, "prelabel-old-000000")
    directory = old.version_dir(PROJECT, 1)
    directory.mkdir(parents=True)
    old.save(VersionInfo("old+p3-v1", PROJECT, 1, "prelabel-old-000000", 0.0, "x"))
    assert Registry(tmp_path, BASE).versions(PROJECT) == []


def test_the_registry_numbers_versions_and_records_their_checksum(tmp_path):
    registry = Registry(tmp_path, BASE)
    registry.version_dir(PROJECT, 2).mkdir(parents=True)  # a number another run has claimed
    first = _add_version(registry)
    second = _add_version(registry, b"other")
    assert (first.number, second.number) == (3, 4) and second.version == f"{BASE}+p3-v4"
    assert first.checksum == file_checksum(registry.version_dir(PROJECT, 3) / WEIGHTS_FILE)
    assert first.base == BASE and first.trained_on == [1, 2] and not first.promoted
    assert [v.number for v in registry.versions(PROJECT)] == [3, 4]  # the empty claim is not a version
    assert registry.active(PROJECT) == BASE  # adding never activates


def test_every_file_of_a_version_is_checked_and_a_failed_write_leaves_nothing(tmp_path):
    registry = Registry(tmp_path, BASE)

    def weights_and_head(directory):
        (directory / WEIGHTS_FILE).write_bytes(b"weights")
        (directory / "zegclip").mkdir()
        (directory / "zegclip" / "zegclip.safetensors").write_bytes(b"head")

    info = registry.add(PROJECT, weights_and_head)
    assert set(info.files) == {WEIGHTS_FILE, "zegclip/zegclip.safetensors"}
    registry.verify(info)
    (registry.version_dir(PROJECT, info.number) / "zegclip" / "zegclip.safetensors").write_bytes(b"bit rot")
    with pytest.raises(BadRequest, match="zegclip.safetensors missing or changed"):
        registry.activate(PROJECT, info.version)

    def disk_full(directory):
        (directory / WEIGHTS_FILE).write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        registry.add(PROJECT, disk_full)
    assert [v.number for v in registry.versions(PROJECT)] == [info.number]
    assert not registry.version_dir(PROJECT, info.number + 1).exists()


def test_a_version_made_from_another_base_is_not_served(tmp_path, redis_url):
    """After an upgrade that changes the base version (weights or algorithm settings), a project
    whose active version was trained from the old base is served the new base, not refused."""
    old = Registry(tmp_path, "prelabel-old-111111", redis.Redis.from_url(redis_url))
    info = _add_version(old)
    old.activate(PROJECT, info.version)
    assert old.active(PROJECT) == info.version
    new = Registry(tmp_path, "prelabel-new-222222", redis.Redis.from_url(redis_url))
    assert new.active(PROJECT) == "prelabel-new-222222"
    assert Registry(tmp_path, "prelabel-new-222222").active(PROJECT) == "prelabel-new-222222"  # from active.json too


def test_promotion_never_undoes_a_version_promoted_meanwhile(tmp_path, redis_url):
    registry = Registry(tmp_path, BASE, redis.Redis.from_url(redis_url))

    def add(made_from: str) -> str:
        write = lambda d: (d / WEIGHTS_FILE).write_bytes(b"w")  # noqa: E731
        return registry.add(PROJECT, write, config={"from_version": made_from}).version

    trained = add(BASE)  # a training run started from the base ...
    few_shot = add(BASE)  # ... while a few-shot version was made from the base and promoted
    assert registry.promote(PROJECT, few_shot, BASE, exact=True)
    assert not registry.promote(PROJECT, add(BASE), BASE, exact=True)  # another few-shot job of the same start: refused
    assert registry.promote(PROJECT, trained, BASE)  # training may replace what was made on top of its start
    assert registry.active(PROJECT) == trained
    assert registry.lineage(PROJECT, few_shot) == [few_shot, BASE]
    assert not registry.promote(PROJECT, add(few_shot), few_shot)  # made from a version no longer in the line
    assert registry.active(PROJECT) == trained
