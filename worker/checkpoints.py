"""A trained version on disk: the base model's ViT with its trained blocks replaced, and the
project's ZegCLIP head when it has one. See backend/registry.py for the layout and the index."""

from __future__ import annotations

import copy
import dataclasses
import logging

from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.errors import ModelUnavailable
from common.versions import WEIGHTS_FILE, Registry, VersionInfo, file_checksum
from worker.model import zegclip
from worker.model.zegclip import ZegCLIP
from worker.predictor import Predictor

log = logging.getLogger(__name__)

HEAD_DIR = "zegclip"


def version_visual(base: VisionTransformer, weights: dict[str, Tensor]) -> VisionTransformer:
    """A copy of ``base`` with the trained blocks in ``weights`` (keys of ``base.state_dict()``)."""
    unknown = set(weights) - set(base.state_dict())
    if unknown:
        raise ValueError(f"weights for another architecture: {sorted(unknown)[:3]}")
    visual = copy.deepcopy(base)
    visual.load_state_dict(weights, strict=False)
    return visual.eval().requires_grad_(False)


def predictor_with(base: Predictor, visual: VisionTransformer, head: ZegCLIP | None) -> Predictor:
    """A predictor for a version: its own ViT and head, the base's text tower, cache and fetcher."""
    bundle = dataclasses.replace(base.bundle, visual=visual.to(base.bundle.device))
    head = head.to(base.bundle.device) if head is not None else None
    return Predictor(base.settings, bundle, fetcher=base.fetcher, text=base.text, head=head)


def load_version(registry: Registry, base: Predictor, project: str, version: str) -> Predictor:
    """Load ``version`` of ``project``; a missing or corrupt version is refused with the reason."""
    try:
        info = registry.get(project, version)
        directory = registry.version_dir(project, info.number)
        registry.verify(info)
        visual = version_visual(base.bundle.visual, load_file(str(directory / WEIGHTS_FILE)))
        head = None
        if (directory / HEAD_DIR / zegclip.WEIGHTS_FILE).is_file():
            head, _ = zegclip.load_checkpoint(directory / HEAD_DIR, visual)
    except Exception as e:  # any failure here means this version cannot serve
        raise ModelUnavailable(f"Cannot load version {version} of project {project}: {e}") from e
    log.info("loaded version %s of project %s from %s", version, project, directory)
    return predictor_with(base, visual, head)


def save_version(
    registry: Registry, info: VersionInfo, weights: dict[str, Tensor], head: ZegCLIP | None, head_meta: dict
) -> VersionInfo:
    """Write a version's weights (and head), then its meta.json with the weights' checksum."""
    directory = registry.version_dir(info.project, info.number)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    if head is not None:
        zegclip.save_checkpoint(head, directory / HEAD_DIR, head_meta)
    info = dataclasses.replace(info, checksum=file_checksum(directory / WEIGHTS_FILE))
    registry.save(info)
    return info
