"""Model versions per project, and which one is active: the one API for both paths.

Every project starts on the base model (``Settings.model_version``). A training run adds a
version (``Registry.add``: the registry numbers it, the trainer writes its files, the registry
records their checksum) under ``MODEL_DIR/registry/<project>/v<N>/``: weights, config, training
data ids, metrics, gate report and checksum (``meta.json``). Promotion is activation
(``Registry.activate``), recorded on disk (``active.json``, the durable record) and in Redis (the
fast path /setup and /predict read, shared by every host). A version is checked against its
checksum before it is activated or loaded.

No torch here: the backend lists, activates and resolves versions; ``worker/checkpoints.py``
writes and reads the weights files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from common import keys
from common.errors import BadRequest, NotFound

META_FILE = "meta.json"
ACTIVE_FILE = "active.json"
WEIGHTS_FILE = "visual.safetensors"

log = logging.getLogger(__name__)


@dataclass
class VersionInfo:
    """What ``meta.json`` says about one trained version."""

    version: str
    project: str
    number: int
    base: str
    created_at: float
    checksum: str  # sha256 of the weights file
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every file the trainer wrote, by path
    trained_on: list[int] = field(default_factory=list)  # Label Studio task ids
    held_out: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # candidate and active, on held_out
    config: dict[str, Any] = field(default_factory=dict)  # how it was trained
    promoted: bool = False
    reason: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """Versions of every project, on disk under ``model_dir`` and indexed in Redis."""

    def __init__(self, model_dir: Path, base_version: str, connection: redis.Redis | None = None) -> None:
        self.root = model_dir / "registry"
        self.base_version = base_version
        self.connection = connection

    def project_dir(self, project: str) -> Path:
        return self.root / re.sub(r"[^0-9A-Za-z_-]", "_", project)

    def version_dir(self, project: str, number: int) -> Path:
        return self.project_dir(project) / f"v{number}"

    def version_name(self, project: str, number: int) -> str:
        """``<base version>+p<id>-v<N>``: names the base it was trained from, and the project."""
        return f"{self.base_version}+p{project.split('.')[0]}-v{number}"

    def active(self, project: str | None) -> str:
        """The version a project's predictions come from: the base model when none was promoted,
        or when the promoted one was trained from another base (the weights or the algorithm
        settings changed since: its files no longer fit, so the project starts again from the base)."""
        if not project:
            return self.base_version
        stored = None
        if self.connection is not None:
            value = self.connection.get(keys.active_version(project))
            stored = value.decode() if value is not None else None
        path = self.project_dir(project) / ACTIVE_FILE
        if stored is None and path.is_file():
            stored = json.loads(path.read_text())["version"]
        if stored is None or stored == self.base_version or stored.startswith(self.base_version + "+"):
            return stored or self.base_version
        log.warning("project %s: active version %s was made from another base; serving %s", project, stored,
                    self.base_version)  # fmt: skip
        return self.base_version

    def lineage(self, project: str, version: str) -> list[str]:
        """``version`` and the versions it was made from, newest first, back to the base model."""
        chain = [version]
        while chain[-1] != self.base_version and len(chain) < 10_000:
            try:
                info = self.get(project, chain[-1])
            except NotFound:
                break
            chain.append((info.config or {}).get("from_version") or self.base_version)
        return chain

    def promote(self, project: str, version: str, made_from: str, exact: bool = False) -> bool:
        """Activate ``version`` unless the active one has moved on from ``made_from``, the version
        it was made from: a learner must not undo what another promoted while it ran. A training
        run may replace the few-shot versions made on top of its start since (``exact`` False; its
        own candidate refits the few-shot learner); a few-shot version may not (``exact``)."""
        lock = self.connection.lock(keys.training_lock(project), timeout=10, blocking_timeout=5) \
            if self.connection is not None else contextlib.nullcontext()  # fmt: skip
        with lock:
            current = self.active(project)
            if current != made_from and (exact or made_from not in self.lineage(project, current)):
                return False
            self.activate(project, version)
            return True

    def versions(self, project: str | None) -> list[VersionInfo]:
        """Trained versions of ``project`` from the current base, oldest first."""
        if not project or not self.project_dir(project).is_dir():
            return []
        found = []
        for meta in self.project_dir(project).glob(f"v*/{META_FILE}"):
            info = VersionInfo.from_dict(json.loads(meta.read_text()))
            if info.base == self.base_version:
                found.append(info)
        return sorted(found, key=lambda v: v.number)

    def get(self, project: str, version: str) -> VersionInfo:
        for info in self.versions(project):
            if info.version == version:
                return info
        raise NotFound(f"Project {project} has no version {version!r}; GET /versions lists them.")

    def next_number(self, project: str) -> int:
        numbers = [int(p.name[1:]) for p in self.project_dir(project).glob("v*") if p.name[1:].isdigit()]
        return max(numbers, default=0) + 1

    def add(self, project: str, write_files: Callable[[Path], None], **details: Any) -> VersionInfo:
        """A new version of ``project``: numbered here (a number is claimed by creating its
        directory, so two runs never share one), its files written by ``write_files(directory)``
        (``WEIGHTS_FILE`` at least), then the checksum of every file and ``details`` (the other
        ``VersionInfo`` fields) recorded in ``meta.json``. Not activated; a failure leaves nothing."""
        number = self.next_number(project)
        while True:
            directory = self.version_dir(project, number)
            try:
                directory.mkdir(parents=True)
                break
            except FileExistsError:
                number += 1
        try:
            write_files(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        files = {str(p.relative_to(directory)): file_checksum(p) for p in sorted(directory.rglob("*")) if p.is_file()}
        info = VersionInfo(
            version=self.version_name(project, number),
            project=project,
            number=number,
            base=self.base_version,
            created_at=time.time(),
            checksum=files[WEIGHTS_FILE],
            files=files,
            **details,
        )
        self.save(info)
        return info

    def save(self, info: VersionInfo) -> None:
        """Write ``meta.json`` for a version whose directory and weights already exist."""
        directory = self.version_dir(info.project, info.number)
        _write_atomically(directory / META_FILE, json.dumps(asdict(info), indent=2))

    def verify(self, info: VersionInfo) -> None:
        """Refuse a version whose files are missing or differ from the checksums taken at save."""
        directory = self.version_dir(info.project, info.number)
        for name, checksum in {**info.files, WEIGHTS_FILE: info.checksum}.items():
            path = directory / name
            if not path.is_file() or file_checksum(path) != checksum:
                raise BadRequest(f"Version {info.version} is corrupt ({name} missing or changed); not activated.")

    def activate(self, project: str, version: str) -> None:
        """Make ``version`` (a trained one, checked, or the base) the one the project predicts with."""
        if version != self.base_version:
            self.verify(self.get(project, version))
        record = json.dumps({"version": version, "activated_at": time.time()})
        if self.connection is not None:  # first: with Redis away, nothing changes
            self.connection.set(keys.active_version(project), version)
        _write_atomically(self.project_dir(project) / ACTIVE_FILE, record)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
