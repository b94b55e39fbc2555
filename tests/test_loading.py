"""Model loading: the normal open_clip ways, and a clear refusal for everything else.
Never random weights unless MODEL_PRETRAINED=random says so."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from common.errors import ModelUnavailable
from common.settings import Settings
from worker.loading import load_clip


def test_open_clip_model_directory_loads_frozen(make_settings, tiny_checkpoint):
    bundle = load_clip(make_settings())
    assert bundle.description == f"checkpoint {tiny_checkpoint}"
    assert not bundle.model.training
    assert not any(p.requires_grad for p in bundle.model.parameters())
    assert bundle.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    tokens = bundle.tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 16)  # the directory's own context length


def test_checkpoint_weights_are_the_saved_ones(make_settings):
    from tests.tiny import build_tiny_clip

    loaded = load_clip(make_settings()).model.state_dict()
    for name, tensor in build_tiny_clip().state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_directory_without_weights_is_refused_not_randomised(make_settings, tiny_checkpoint, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(tiny_checkpoint / "open_clip_config.json", empty)
    with pytest.raises(ModelUnavailable, match="no weights file"):
        load_clip(make_settings(model_checkpoint=str(empty)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_checkpoint": "/nonexistent/model"}, "does not exist"),
        ({"model_name": "ViT-Nope-1", "model_pretrained": "random", "model_checkpoint": None},
         "not an open_clip model"),
        ({"model_pretrained": "imagenet-nope", "model_checkpoint": None}, "not a known tag.*openai"),
        ({"model_name": "RN50", "model_pretrained": "random", "model_checkpoint": None},
         "cannot run TagCLIP.*not a ViT"),
    ],
)  # fmt: skip
def test_bad_model_settings_are_explained(make_settings, overrides, message):
    with pytest.raises(ModelUnavailable, match=message):
        load_clip(make_settings(**overrides))


def test_checkpoint_file_must_fit_the_model_name(make_settings, tiny_checkpoint):
    weights = tiny_checkpoint / "open_clip_model.safetensors"
    with pytest.raises(ModelUnavailable, match="does not fit MODEL_NAME=ViT-S-32"):
        load_clip(make_settings(model_checkpoint=str(weights), model_name="ViT-S-32"))


def test_random_weights_only_when_asked(make_settings):
    bundle = load_clip(make_settings(model_checkpoint=None, model_name="ViT-S-32", model_pretrained="random"))
    assert "random weights" in bundle.description


def test_missing_pretrained_weights_stop_with_instructions(tmp_path):
    """No hub access here: loading the default weights must fail fast with the ways to fix it."""
    script = (
        "from common.settings import Settings\n"
        "from worker.loading import load_clip\n"
        f"load_clip(Settings(model_dir={str(tmp_path)!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ModelUnavailable" in done.stderr
    for hint in ("MODEL_DIR", str(tmp_path), "MODEL_CHECKPOINT", "cache_dir='model-cache'"):
        assert hint in done.stderr


def test_default_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from worker.loading import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelUnavailable, match="no CUDA device"):
        resolve_device("cuda")
    assert Settings().device == "auto"


def test_precision_follows_the_setting_and_the_hardware(monkeypatch):
    from worker import loading

    cpu = torch.device("cpu")
    assert loading.resolve_precision("fp32", cpu) == torch.float32
    assert loading.resolve_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f"})  # bf16 would be emulated: slower
    assert loading.resolve_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert loading.resolve_precision("auto", cpu) == torch.bfloat16


def test_loaded_model_reports_its_precision(make_settings):
    assert load_clip(make_settings(precision="fp32")).precision == torch.float32
    assert load_clip(make_settings(precision="bf16")).precision == torch.bfloat16
