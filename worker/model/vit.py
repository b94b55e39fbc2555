"""open_clip's ViT image tower, run block by block so attention can be read and altered.

open_clip's own forward interpolates no positional embeddings and hides attention weights
(``need_weights=False``). These functions re-express the same computation from the module's own
weights: ``encode_tokens`` on a 224 image equals ``model.encode_image`` (tested to 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor

#: Called with (block index, head-averaged attention [B, L, L]) while blocks run.
AttentionObserver = Callable[[int, Tensor], None]


def patch_size(visual: VisionTransformer) -> int:
    return int(visual.patch_size[0])


def native_grid(visual: VisionTransformer) -> tuple[int, int]:
    return int(visual.grid_size[0]), int(visual.grid_size[1])


def patch_grid(visual: VisionTransformer, pixels: Tensor) -> tuple[int, int]:
    """(h, w): the patches of images [..., H, W] whose sides are multiples of the patch size."""
    p = patch_size(visual)
    return pixels.shape[-2] // p, pixels.shape[-1] // p


#: How grid positions are resized to another grid: bilinear as TagCLIP; ClearCLIP's and NACLIP's
#: repositories use bicubic, which measured no better on the toy world (bench/recipes.py, and
#: docs/algorithms.md). Sliding windows run at the native grid and resize nothing.
POSITION_INTERPOLATION = "bilinear"


def positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> Tensor:
    """[1 + h*w, D] positions for an h x w patch grid: the class position as is, the grid ones
    resized (``POSITION_INTERPOLATION``) from the grid the model was trained on."""
    pos = visual.positional_embedding
    if grid == native_grid(visual):
        return pos
    gh, gw = native_grid(visual)
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos.float(), size=grid, mode=POSITION_INTERPOLATION, align_corners=False)
    grid_pos = grid_pos.to(pos.dtype)
    return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def embed(visual: VisionTransformer, pixels: Tensor) -> Tensor:
    """Pixels [B, 3, H, W] (H, W multiples of the patch size) -> tokens [B, 1 + h*w, D] after ln_pre."""
    x = visual.conv1(pixels)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + positional_embedding(visual, grid).to(x.dtype)
    return visual.ln_pre(x)


def qkv(block: ResidualAttentionBlock, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ln_1 then the input projection, split into heads: three [B, H, L, d]."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    B, L, D = q.shape
    heads = attn.num_heads
    return tuple(t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]


def merge_heads(block: ResidualAttentionBlock, attended: Tensor) -> Tensor:
    """[B, H, L, d] attention outputs -> [B, L, D] through the block's out_proj."""
    B, _, L, _ = attended.shape
    return block.attn.out_proj(attended.transpose(1, 2).reshape(B, L, -1))


def finish_block(block: ResidualAttentionBlock, x: Tensor, attended: Tensor) -> Tensor:
    """Merge heads, then both residual branches (attention, then MLP)."""
    x = x + block.ls_1(merge_heads(block, attended))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def attention_logits(q: Tensor, k: Tensor) -> Tensor:
    """Scaled dot-product logits [B, H, L, L], in float32 so softmaxes of long sequences stay exact.
    ``q`` is scaled before the product, not the [L, L] result (one pass fewer over the largest
    tensor of the trunk; exact for head widths whose scale is a power of two, such as 64)."""
    return (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)


def block_forward(
    block: ResidualAttentionBlock,
    x: Tensor,
    attn_mask: Tensor | None = None,
    observe: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """One residual block through SDPA. ``attn_mask`` is additive ([L, L] or [B, 1, L, L]); with
    ``observe``, the head-averaged attention is also computed explicitly and passed to it (the
    output still comes from SDPA: cheaper than casting the [B, H, L, L] weights and multiplying)."""
    q, k, v = qkv(block, x)
    if observe is not None:
        logits = attention_logits(q, k)
        if attn_mask is not None:
            logits = logits + attn_mask
        observe(logits.softmax(dim=-1).mean(dim=1))
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    return finish_block(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def run_blocks(
    visual: VisionTransformer,
    x: Tensor,
    blocks: range,
    attn_mask: Tensor | None = None,
    observer: AttentionObserver | None = None,
) -> Tensor:
    """Run ``visual.transformer.resblocks[i]`` for i in ``blocks``."""
    for i in blocks:
        observe = (lambda a, i=i: observer(i, a)) if observer is not None else None
        x = block_forward(visual.transformer.resblocks[i], x, attn_mask, observe)
    return x


def trunk(visual: VisionTransformer, pixels: Tensor, observer: AttentionObserver | None = None) -> Tensor:
    """Tokens [B, 1 + h*w, D] before the last block: what every dense head and TagCLIP's local
    stage share (each replaces the last block in its own way)."""
    return run_blocks(visual, embed(visual, pixels), range(len(visual.transformer.resblocks) - 1), observer=observer)


def self_attending_block(
    block: ResidualAttentionBlock, x: Tensor, penalty: float, observe: Callable[[Tensor], None] | None = None
) -> Tensor:
    """TagCLIP's last block: every token attends (almost) only to itself, which keeps patch tokens
    local. ``observe`` receives the block's unmasked attention."""
    q, k, v = qkv(block, x)
    if observe is not None:
        observe(attention_logits(q, k).softmax(dim=-1).mean(dim=1))
    L = q.shape[-2]
    off_diagonal = penalty * (1.0 - torch.eye(L, device=q.device, dtype=q.dtype))
    return finish_block(block, x, F.scaled_dot_product_attention(q, k, v, attn_mask=off_diagonal))


def project(visual: VisionTransformer, x: Tensor) -> Tensor:
    """Tokens [B, L, D] -> L2-normalised embeddings [B, L, E] in the text space."""
    return F.normalize(visual.ln_post(x) @ visual.proj, dim=-1)


def encode_tokens(visual: VisionTransformer, pixels: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """All tokens of a plain forward, projected (unnormalised): [B, L, E]. Row 0 is the image embedding."""
    x = run_blocks(visual, embed(visual, pixels), range(len(visual.transformer.resblocks)), attn_mask)
    return visual.ln_post(x) @ visual.proj
