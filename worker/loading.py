"""Load a CLIP model through open_clip, the normal way, or stop with a message that says how to
provide the weights. Never falls back to random weights unless ``MODEL_PRETRAINED=random``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from common.errors import ModelUnavailable
from common.settings import Settings
from worker.model.bundle import ClipBundle

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"DEVICE={name} but no CUDA device is visible to this process.")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``PRECISION`` -> a dtype. ``auto`` picks bf16 where the hardware has bf16 arithmetic (CUDA
    GPUs since Ampere; CPUs with AVX512-BF16 or AMX, where it about halves the time) and fp32
    elsewhere, where bf16 would be emulated and slower."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return torch.bfloat16
    return torch.float32


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_clip(settings: Settings) -> ClipBundle:
    """Build the model that ``settings`` name, on ``settings.device``, frozen and in eval mode.

    Raises:
        ModelUnavailable: weights missing, unknown model or tag, or an architecture TagCLIP
            cannot run on. The message says what to do.
    """
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    if settings.model_checkpoint:
        model, tokenizer, description = _from_checkpoint(settings)
    elif settings.random_weights:
        log.warning("MODEL_PRETRAINED=random: %s with RANDOM weights (tests and demos only)", settings.model_name)
        model = _create(settings.model_name)
        tokenizer = open_clip.get_tokenizer(settings.model_name)
        description = f"{settings.model_name} (random weights)"
    else:
        model = _from_tag(settings)
        tokenizer = open_clip.get_tokenizer(settings.model_name)
        description = f"{settings.model_name} pretrained={settings.model_pretrained}"
    _check_architecture(model, description)
    model = model.to(device).eval().requires_grad_(False)
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    log.info("loaded %s on %s, computing in %s", description, device, str(precision).removeprefix("torch."))
    return ClipBundle(
        model=model,
        tokenizer=tokenizer,
        mean=tuple(preprocess.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_DATASET_STD)),
        device=device,
        description=description,
        precision=precision,
    )


def _create(name: str, **kwargs: Any) -> open_clip.CLIP:
    try:
        return open_clip.create_model(name, **kwargs)
    except RuntimeError as e:
        if "not found in built-ins" in str(e):
            raise ModelUnavailable(
                f"MODEL_NAME={name} is not an open_clip model; `open_clip.list_models()` lists them."
            ) from e
        raise


def _from_tag(settings: Settings) -> open_clip.CLIP:
    name, tag = settings.model_name, settings.model_pretrained
    known = open_clip.list_pretrained_tags_by_model(name)
    if tag not in known:
        raise ModelUnavailable(
            f"MODEL_PRETRAINED={tag} is not a known tag for MODEL_NAME={name}. Known tags: "
            f"{', '.join(known) or 'none'}; or set MODEL_CHECKPOINT to a local weights file."
        )
    cache = settings.model_dir
    try:
        return open_clip.create_model(name, pretrained=tag, cache_dir=str(cache))
    except (RuntimeError, OSError) as e:
        raise ModelUnavailable(
            f"Could not load the '{tag}' weights of {name}: they are not in MODEL_DIR ({cache}) and could "
            f"not be downloaded ({str(e)[:200]}). Fix it one of three ways: (1) give this machine internet "
            'access once; (2) on a machine that has it, run `python -c "import open_clip; '
            f"open_clip.create_model('{name}', pretrained='{tag}', cache_dir='model-cache')\"` and copy "
            "model-cache/ to this machine's MODEL_DIR; (3) set MODEL_CHECKPOINT to a local weights file "
            "or an open_clip model directory (open_clip_config.json + weights)."
        ) from e


def _from_checkpoint(settings: Settings) -> tuple[open_clip.CLIP, Any, str]:
    path = Path(settings.model_checkpoint or "").expanduser()
    if not path.exists():
        raise ModelUnavailable(f"MODEL_CHECKPOINT={path} does not exist.")
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ModelUnavailable(
                f"MODEL_CHECKPOINT={path} is a directory without open_clip_config.json; an open_clip "
                "model directory holds that file and the weights."
            )
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            # open_clip would warn and continue with random weights here; we refuse.
            raise ModelUnavailable(f"MODEL_CHECKPOINT={path} has a config but no weights file ({WEIGHT_SUFFIXES}).")
        spec = f"local-dir:{path}"
        return _create(spec), open_clip.get_tokenizer(spec), f"checkpoint {path}"
    try:
        model = _create(settings.model_name, pretrained=str(path))
    except (RuntimeError, AssertionError, KeyError, ValueError) as e:  # shapes or keys that do not match
        raise ModelUnavailable(f"MODEL_CHECKPOINT={path} does not fit MODEL_NAME={settings.model_name}: {e}") from e
    return model, open_clip.get_tokenizer(settings.model_name), f"{settings.model_name} from {path}"


def _check_architecture(model: nn.Module, description: str) -> None:
    """TagCLIP reads attention maps block by block: it needs open_clip's plain ViT."""
    visual = getattr(model, "visual", None)
    problem = None
    if not isinstance(visual, VisionTransformer):
        problem = f"its image tower is {type(visual).__name__}, not a ViT"
    elif visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        problem = "its ViT does not pool with a class token"
    elif not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
        problem = "its ViT uses custom attention blocks"
    if problem:
        raise ModelUnavailable(
            f"{description} cannot run TagCLIP: {problem}. Use a CLIP ViT such as ViT-B-16-quickgelu."
        )
