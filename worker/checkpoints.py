"""A trained version's files: the ViT blocks CLIPSelf changed, the project's ZegCLIP head, and
its few-shot adapter and tag thresholds.

``common/versions.py`` numbers versions, checks their checksums and activates them; this module
writes and reads the tensors inside a version's directory (and a ZegCLIP head anywhere):

    v<N>/visual.safetensors        the trained blocks, keyed as in the ViT's state_dict (none: the base's)
    v<N>/zegclip/zegclip.safetensors + zegclip.json   the head's prompts and decoder, its config
    v<N>/adapter.json              per-label tag thresholds, the tag cache's labels, alpha, beta,
                                   and under "regions" the region prototypes' labels and gamma
    v<N>/adapter.safetensors       the tag cache: keys (image embeddings) and values (labels)
    v<N>/regions.safetensors       the region prototypes and the "no label" one
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.versions import WEIGHTS_FILE, Registry
from worker.model.adapter import FewShot, RegionPrototypes, TipAdapter
from worker.model.zegclip import ZegCLIP, ZegCLIPConfig

HEAD_DIR = "zegclip"
HEAD_WEIGHTS = "zegclip.safetensors"
HEAD_CONFIG = "zegclip.json"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_CACHE = "adapter.safetensors"
REGION_CACHE = "regions.safetensors"


class LoadedVersion(NamedTuple):
    """What a version changes in the base model (``Predictor.with_weights`` takes these)."""

    visual: VisionTransformer
    head: ZegCLIP | None
    few_shot: FewShot


def version_visual(base: VisionTransformer, weights: dict[str, Tensor]) -> VisionTransformer:
    """A copy of ``base`` with the trained blocks in ``weights`` (keys of ``base.state_dict()``)."""
    unknown = set(weights) - set(base.state_dict())
    if unknown:
        raise ValueError(f"weights for another architecture: {sorted(unknown)[:3]}")
    visual = copy.deepcopy(base)
    visual.load_state_dict(weights, strict=False)
    return visual.eval().requires_grad_(False)


def write_version(
    directory: Path, weights: dict[str, Tensor], head: ZegCLIP | None, head_meta: dict, few_shot: FewShot | None = None
) -> None:
    """Fill a new version's directory (``Registry.add`` calls this with the one it numbered)."""
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    if head is not None:
        save_head(head, directory / HEAD_DIR, head_meta)
    write_adapter(directory, few_shot or FewShot())


def write_adapter(directory: Path, few_shot: FewShot) -> None:
    """The few-shot learner's thresholds and caches (nothing when it fitted nothing)."""
    adapter, prototypes = few_shot.adapter, few_shot.prototypes
    if adapter is None and prototypes is None and not few_shot.thresholds:
        return
    config: dict[str, Any] = {"thresholds": dict(few_shot.thresholds), "tag_scores": few_shot.tag_scores}
    if adapter is not None:
        _save(directory / ADAPTER_CACHE, {"keys": adapter.keys, "values": adapter.values})
        config |= {"labels": list(adapter.labels), "alpha": adapter.alpha, "beta": adapter.beta}
    if prototypes is not None:
        background = {} if prototypes.background is None else {"background": prototypes.background}
        _save(directory / REGION_CACHE, {"prototypes": prototypes.prototypes, **background})
        config["regions"] = {"labels": list(prototypes.labels), "gamma": prototypes.gamma,
                             "painted": list(prototypes.painted), "features": prototypes.features}  # fmt: skip
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.float().contiguous().cpu() for k, v in tensors.items()}, str(path))


def carry_over(source: Path | None, directory: Path) -> None:
    """Copy a version's trained blocks and head into a new version's ``directory`` (the few-shot
    learner adds to the active version, it does not retrain it); ``source`` None: the base model."""
    if source is None:
        save_file({}, str(directory / WEIGHTS_FILE))
        return
    # Linked, not copied: a few-shot version every few corrections must not add a ViT's weights each time.
    _link(source / WEIGHTS_FILE, directory / WEIGHTS_FILE)
    if (source / HEAD_DIR).is_dir():
        shutil.copytree(source / HEAD_DIR, directory / HEAD_DIR, copy_function=_link)


def _link(source: str | Path, target: str | Path) -> None:
    """A hard link (versions are never written after they are made), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_version(registry: Registry, project: str, version: str, base: VisionTransformer) -> LoadedVersion:
    """The ViT, head, adapter and thresholds of ``version`` of ``project``, after checking its checksums.

    Raises:
        NotFound, BadRequest (corrupt), ValueError (another architecture): with the reason.
    """
    info = registry.get(project, version)
    registry.verify(info)
    directory = registry.version_dir(project, info.number)
    weights = load_file(str(directory / WEIGHTS_FILE))
    visual = version_visual(base, weights) if weights else base  # few-shot only: the base's own ViT
    head = load_head(directory / HEAD_DIR, visual)[0] if (directory / HEAD_DIR / HEAD_WEIGHTS).is_file() else None
    return LoadedVersion(visual, head, read_adapter(directory, base.output_dim))


def read_adapter(directory: Path, embed_dim: int) -> FewShot:
    """What a version's few-shot learner fitted (the empty ``FewShot`` for a version without)."""
    if not (directory / ADAPTER_CONFIG).is_file():
        return FewShot()
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    thresholds = {str(k): float(v) for k, v in config.get("thresholds", {}).items()}
    if not all(math.isfinite(t) for t in thresholds.values()):
        raise ValueError(f"The tag thresholds in {directory} are not all finite numbers.")
    tag_scores = str(config.get("tag_scores", "tagclip"))  # versions from before TAG_SCORES: TagCLIP's
    return FewShot(thresholds, _tag_cache(directory, config, embed_dim), _region_cache(directory, config, embed_dim),
                   tag_scores)  # fmt: skip


def _tag_cache(directory: Path, config: dict, embed_dim: int) -> TipAdapter | None:
    if not (directory / ADAPTER_CACHE).is_file():
        return None
    cache = load_file(str(directory / ADAPTER_CACHE))
    keys, values, labels = cache["keys"], cache["values"], tuple(config["labels"])
    alpha, beta = float(config["alpha"]), float(config["beta"])
    if keys.ndim != 2 or keys.shape[1] != embed_dim or values.shape != (keys.shape[0], len(labels)):
        raise ValueError(f"The few-shot adapter in {directory} was built for another model or label set.")
    if not (0 <= alpha <= 1 and 0 < beta < 1000):
        raise ValueError(f"The few-shot adapter in {directory} has alpha {alpha} or beta {beta} out of range.")
    return TipAdapter(keys, values, labels, alpha, beta)


def _region_cache(directory: Path, config: dict, embed_dim: int) -> RegionPrototypes | None:
    if not (directory / REGION_CACHE).is_file():
        return None
    cache, meta = load_file(str(directory / REGION_CACHE)), config.get("regions")
    prototypes, background = cache.get("prototypes"), cache.get("background")
    if not isinstance(meta, dict) or prototypes is None:
        raise ValueError(f"The region prototypes in {directory} have no labels or no prototypes.")
    labels, painted = tuple(map(str, meta.get("labels", ()))), tuple(map(str, meta.get("painted", ())))
    gamma, features = float(meta.get("gamma", 0)), str(meta.get("features", ""))
    if prototypes.shape != (len(labels), embed_dim) or (background is not None and background.shape != (embed_dim,)):
        raise ValueError(f"The region prototypes in {directory} were built for another model or label set.")
    if not 0 < gamma <= 1 or not set(labels) <= set(painted):
        raise ValueError(f"The region prototypes in {directory} have gamma {gamma} out of range or unknown labels.")
    if not torch.isfinite(prototypes).all() or (background is not None and not torch.isfinite(background).all()):
        raise ValueError(f"The region prototypes in {directory} are not all finite numbers.")
    background = None if background is None else F.normalize(background, dim=0)
    return RegionPrototypes(labels, F.normalize(prototypes, dim=-1), background, gamma, painted, features)


def save_head(model: ZegCLIP, directory: Path, meta: dict[str, Any]) -> None:
    """Write the prompts and head (``zegclip.safetensors``) and config + ``meta`` (JSON)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({"config": asdict(model.cfg), **meta}, indent=2))


def load_head(directory: Path, visual: VisionTransformer) -> tuple[ZegCLIP, dict[str, Any]]:
    """The head saved in ``directory``, built for ``visual``; raises ValueError if it does not fit."""
    info = json.loads((directory / HEAD_CONFIG).read_text())
    state = load_file(str(directory / HEAD_WEIGHTS))
    projected = "head.input_proj.weight" in state  # the weights say, for heads saved before the option too
    model = ZegCLIP(visual, ZegCLIPConfig(**{**info["config"], "project_patches": projected}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"The ZegCLIP head in {directory} was trained for another backbone: {e}") from e
    return model.eval(), info
