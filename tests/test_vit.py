"""The manual block loop must be open_clip's own forward, re-expressed."""

import copy

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed

from tests.tiny import TINY_CLIP, build_tiny_clip
from worker.model import vit

#: A second shape: ViT-B/16's input geometry (224 px, patch 16) at toy width.
AT_224 = {**TINY_CLIP, "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32}}


def _model(cfg: dict) -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg).eval()


@pytest.mark.parametrize("cfg", [TINY_CLIP, AT_224], ids=["64px-patch8", "224px-patch16"])
def test_block_loop_reproduces_encode_image(cfg):
    model = _model(cfg)
    size = cfg["vision_cfg"]["image_size"]
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model.encode_image(pixels)
        ours = vit.encode_tokens(model.visual, pixels)[:, 0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_non_square_input_matches_a_model_built_for_that_size():
    """A 64x96 input through the 64x64 model equals open_clip's forward of the same weights built
    for 64x96, with open_clip's own positional resize (bilinear)."""
    small = build_tiny_clip()
    wide_cfg = copy.deepcopy(TINY_CLIP)
    wide_cfg["vision_cfg"]["image_size"] = (64, 96)
    wide = open_clip.CLIP(**wide_cfg).eval()
    state = small.state_dict()
    resize_pos_embed(state, wide, interpolation="bilinear", antialias=False)
    wide.load_state_dict(state)

    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = wide.encode_image(pixels)
        ours = vit.encode_tokens(small.visual, pixels)[:, 0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_observed_attention_is_a_head_average_that_does_not_change_the_output():
    model = build_tiny_clip()
    visual = model.visual
    x = vit.embed(visual, torch.randn(1, 3, 64, 80))
    seen = []
    with torch.no_grad():
        plain = vit.run_blocks(visual, x, range(6))
        observed = vit.run_blocks(visual, x, range(6), observer=lambda i, a: seen.append((i, a)))
    torch.testing.assert_close(observed, plain, atol=1e-5, rtol=1e-5)
    assert [i for i, _ in seen] == list(range(6))
    L = 1 + 8 * 10
    for _, attention in seen:
        assert attention.shape == (1, L, L)
        torch.testing.assert_close(attention.sum(-1), torch.ones(1, L))  # rows are distributions


def test_self_attending_block_keeps_tokens_local():
    """With the -100 penalty each token's attention is on itself, so shuffling the other tokens
    leaves a token's output unchanged."""
    model = build_tiny_clip()
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    x = vit.embed(visual, torch.randn(1, 3, 64, 64))
    unmasked = []
    with torch.no_grad():
        out = vit.self_attending_block(block, x, penalty=-100.0, observe=unmasked.append)
        shuffled = torch.cat([x[:, :1], x[:, 1:].flip(1)], dim=1)
        out_shuffled = vit.self_attending_block(block, shuffled, penalty=-100.0)
    torch.testing.assert_close(out_shuffled[:, 1:].flip(1), out[:, 1:], atol=1e-5, rtol=1e-4)
    # what the observer sees is the block's ordinary (unmasked) attention, not the identity
    assert unmasked[0][0].diagonal().mean() < 0.9


def test_positional_embedding_is_untouched_at_the_native_grid_and_interpolated_elsewhere():
    visual = build_tiny_clip().visual
    assert vit.positional_embedding(visual, (8, 8)) is visual.positional_embedding
    pos = vit.positional_embedding(visual, (4, 12))
    assert pos.shape == (1 + 48, 64)
    torch.testing.assert_close(pos[0], visual.positional_embedding[0])
