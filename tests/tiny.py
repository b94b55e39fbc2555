"""Tiny CLIP models for tests: built from an explicit config with random weights, saved as an
open_clip model directory and loaded through the service's normal MODEL_CHECKPOINT path."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

#: 6 blocks so TagCLIP's layer choices (refine 2..4, vote >= 2) are non-trivial; patch 8 at 64 px.
TINY_CLIP: dict = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(seed: int = 0) -> open_clip.CLIP:
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP).eval()


def save_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny_clip(seed)
    config = {
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory
