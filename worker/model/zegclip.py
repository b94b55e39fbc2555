"""ZegCLIP (Zhou et al., CVPR 2023): a segmentation head trained on a project's corrected masks,
on top of the frozen CLIP ViT (docs/algorithms.md section 4).

* Deep prompt tuning: learned tokens join the sequence after the class token and are replaced
  before every block; a shared Linear + Dropout maps them, a new LayerNorm closes the encoder.
* Relationship descriptor: each class query is ``Linear([g * t_c ; t_c])`` with ``g`` the image
  embedding and ``t_c`` the frozen text embedding, so classes stay open-vocabulary.
* Decoder: 3 post-norm layers of cross-attention from class queries to patch features (no query
  self-attention, so a class's mask does not depend on which other classes are asked); the last
  layer's head-averaged attention logits are the masks.
* Patch features enter the decoder through a Linear + LayerNorm (``project_patches``, the
  official code's ``use_proj``), a measured departure: both official configs leave it off, and
  train 20k steps or more; a project's head trains a few thousand, and on the toy world the
  projection raised mask mIoU from 0.70 to 0.82 at 2,000 steps (docs/algorithms.md section 4).
* Loss: sigmoid focal (x100) + dice (x1), non-mutually-exclusive, both normalised as the reference
  ``criterion.py`` does: each class map's focal term is its mean over pixels, summed over the
  batch's maps and divided by the number of masks present (so focal keeps its weight against dice
  whatever the number of classes asked); pixels marked ignore are left out, unlike the reference.

Only the prompts and the head train: a checkpoint holds those (megabytes), not the backbone
(``worker/checkpoints.py`` writes and reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from worker.model import vit

# Target maps hold class indices >= 0, or one of these:
NO_CLASS = -1  # a pixel of none of the classes (every class is a negative there)
IGNORE = -100  # a pixel without supervision (boundaries, unlabelled areas)


@dataclass(frozen=True)
class ZegCLIPConfig:
    prompts: int = 10  # prompt tokens per block (the paper: 10 for VOC, 100 for COCO)
    decoder_layers: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    mask_threshold: float = 0.5  # sigmoid score under which a pixel gets no label (calibrated after training)
    project_patches: bool = True  # a Linear + LayerNorm on the patch features (use_proj; off officially)


class DeepPrompts(nn.Module):
    """Learned tokens for every block of a frozen ViT."""

    def __init__(self, depth: int, width: int, count: int, patch: int, dropout: float) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's xavier-style range
        self.count = count
        self.shallow = nn.Parameter(torch.empty(1, count, width).uniform_(-bound, bound))
        self.deep = nn.Parameter(torch.empty(depth - 1, count, width).uniform_(-bound, bound))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def tokens(self, block: int, batch: int) -> Tensor:
        raw = self.shallow[0] if block == 0 else self.deep[block - 1]
        return self.dropout(self.proj(raw)).expand(batch, -1, -1)


class RelationDecoderLayer(nn.Module):
    """Cross-attention from class queries to patch features, then an FFN; post-norm."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """queries [B, C, d], memory [B, N, d] -> (queries, head-averaged logits [B, C, N])."""
        B, C, d = queries.shape
        heads = self.heads
        q = self.q(queries).reshape(B, C, heads, d // heads).transpose(1, 2)
        k = self.k(memory).reshape(B, -1, heads, d // heads).transpose(1, 2)
        v = self.v(memory).reshape(B, -1, heads, d // heads).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5  # [B, H, C, N]
        attended = self.attn_dropout(logits.softmax(dim=-1)) @ v
        queries = self.norm1(queries + self.dropout1(self.out(attended.transpose(1, 2).reshape(B, C, d))))
        queries = self.norm2(queries + self.dropout2(self.ffn(queries)))
        return queries, logits.mean(dim=1)


class ZegCLIPHead(nn.Module):
    """Relationship descriptor + decoder: image and text embeddings in, mask logits out."""

    def __init__(self, dim: int, cfg: ZegCLIPConfig) -> None:
        super().__init__()
        self.input_proj = nn.Linear(dim, dim) if cfg.project_patches else None
        self.input_norm = nn.LayerNorm(dim) if cfg.project_patches else None
        self.relation = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            RelationDecoderLayer(dim, cfg.decoder_heads, cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, image: Tensor, patches: Tensor, text: Tensor, grid: tuple[int, int]) -> Tensor:
        """image [B, E], patches [B, N, E], text [C, E] -> mask logits [B, C, h, w]."""
        memory = self.input_norm(self.input_proj(patches)) if self.input_proj is not None else patches
        t = text[None].expand(image.shape[0], -1, -1)
        queries = self.relation(torch.cat([image[:, None] * t, t], dim=-1))
        logits = None
        for layer in self.layers:
            queries, logits = layer(queries, memory)
        assert logits is not None
        return logits.reshape(image.shape[0], text.shape[0], *grid)


class ZegCLIP(nn.Module):
    """Prompts and head. The frozen ViT is passed to ``forward``, so it never enters a checkpoint."""

    def __init__(self, visual: VisionTransformer, cfg: ZegCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = visual.conv1.out_channels
        depth = len(visual.transformer.resblocks)
        self.prompts = DeepPrompts(depth, width, cfg.prompts, vit.patch_size(visual), cfg.dropout)
        self.head = ZegCLIPHead(visual.output_dim, cfg)

    def encode(self, visual: VisionTransformer, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Prompted forward: normalised image embedding [B, E], patch embeddings [B, N, E], grid."""
        x = vit.embed(visual, pixels)
        B, n = x.shape[0], self.prompts.count
        x = torch.cat([x[:, :1], self.prompts.tokens(0, B).to(x.dtype), x[:, 1:]], dim=1)
        for i, block in enumerate(visual.transformer.resblocks):
            if i > 0:
                x = torch.cat([x[:, :1], self.prompts.tokens(i, B).to(x.dtype), x[:, 1 + n :]], dim=1)
            x = vit.block_forward(block, x)
        out = vit.project(visual, self.prompts.norm(x))
        return out[:, 0], out[:, 1 + n :], vit.patch_grid(visual, pixels)

    def forward(self, visual: VisionTransformer, pixels: Tensor, text: Tensor) -> Tensor:
        """Mask logits [B, C, h, w] on the patch grid for the classes in ``text`` [C, E]."""
        image, patches, grid = self.encode(visual, pixels)
        return self.head(image, patches, text.to(patches.dtype), grid)


def one_hot_targets(mask: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """[B, H, W] target map (class index, NO_CLASS or IGNORE) -> one-hot targets [B, C, H, W]
    and a validity map [B, 1, H, W]."""
    valid = (mask != IGNORE)[:, None]
    index = torch.where((mask >= 0) & (mask < classes), mask, classes)
    targets = F.one_hot(index, classes + 1)[..., :classes].permute(0, 3, 1, 2).float()
    return targets, valid


def segmentation_loss(logits: Tensor, mask: Tensor, cfg: ZegCLIPConfig) -> Tensor:
    """Sigmoid focal loss over every class map (its mean over valid pixels, summed over the maps,
    divided by the number of masks present), plus dice on the masks present. ``logits``
    [B, C, H, W] at the mask's size; ``mask`` [B, H, W] as in ``one_hot_targets``."""
    targets, valid = one_hot_targets(mask, logits.shape[1])
    weight = valid.float().expand_as(logits)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    present = (targets * weight).flatten(2).sum(-1) > 0  # [B, C]
    per_map = (alpha_t * (1 - p_t) ** 2 * ce * weight).flatten(2).sum(-1) / weight.flatten(2).sum(-1).clamp(min=1)
    focal = per_map.sum() / present.sum().clamp(min=1)

    inter = (p * targets * weight).flatten(2).sum(-1)
    total = (p * weight).flatten(2).sum(-1) + (targets * weight).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (total + 1)
    dice = dice[present].mean() if present.any() else logits.sum() * 0
    return cfg.focal_weight * focal + cfg.dice_weight * dice
