"""A trained version's files: the ViT blocks CLIPSelf changed and the project's ZegCLIP head.

``common/versions.py`` numbers versions, checks their checksums and activates them; this module
writes and reads the tensors inside a version's directory (and a ZegCLIP head anywhere):

    v<N>/visual.safetensors        the trained blocks, keyed as in the ViT's state_dict
    v<N>/zegclip/zegclip.safetensors + zegclip.json   the head's prompts and decoder, its config
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.versions import WEIGHTS_FILE, Registry
from worker.model.zegclip import ZegCLIP, ZegCLIPConfig

HEAD_DIR = "zegclip"
HEAD_WEIGHTS = "zegclip.safetensors"
HEAD_CONFIG = "zegclip.json"


def version_visual(base: VisionTransformer, weights: dict[str, Tensor]) -> VisionTransformer:
    """A copy of ``base`` with the trained blocks in ``weights`` (keys of ``base.state_dict()``)."""
    unknown = set(weights) - set(base.state_dict())
    if unknown:
        raise ValueError(f"weights for another architecture: {sorted(unknown)[:3]}")
    visual = copy.deepcopy(base)
    visual.load_state_dict(weights, strict=False)
    return visual.eval().requires_grad_(False)


def write_version(directory: Path, weights: dict[str, Tensor], head: ZegCLIP | None, head_meta: dict) -> None:
    """Fill a new version's directory (``Registry.add`` calls this with the one it numbered)."""
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    if head is not None:
        save_head(head, directory / HEAD_DIR, head_meta)


def read_version(
    registry: Registry, project: str, version: str, base: VisionTransformer
) -> tuple[VisionTransformer, ZegCLIP | None]:
    """The ViT and head of ``version`` of ``project``, after checking its checksum.

    Raises:
        NotFound, BadRequest (corrupt), ValueError (another architecture): with the reason.
    """
    info = registry.get(project, version)
    registry.verify(info)
    directory = registry.version_dir(project, info.number)
    visual = version_visual(base, load_file(str(directory / WEIGHTS_FILE)))
    head = load_head(directory / HEAD_DIR, visual)[0] if (directory / HEAD_DIR / HEAD_WEIGHTS).is_file() else None
    return visual, head


def save_head(model: ZegCLIP, directory: Path, meta: dict[str, Any]) -> None:
    """Write the prompts and head (``zegclip.safetensors``) and config + ``meta`` (JSON)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({"config": asdict(model.cfg), **meta}, indent=2))


def load_head(directory: Path, visual: VisionTransformer) -> tuple[ZegCLIP, dict[str, Any]]:
    """The head saved in ``directory``, built for ``visual``; raises ValueError if it does not fit."""
    info = json.loads((directory / HEAD_CONFIG).read_text())
    model = ZegCLIP(visual, ZegCLIPConfig(**info["config"]))
    try:
        model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    except RuntimeError as e:
        raise ValueError(f"The ZegCLIP head in {directory} was trained for another backbone: {e}") from e
    return model.eval(), info
