"""TagCLIP: training-free multi-label tags from a frozen CLIP ViT (Lin et al., AAAI 2024).

Local-to-global: classify every patch (with a self-attending last block that keeps patches
local), refine the patch scores with the model's own attention (DMAR), take each class's best
patch, then re-identify each candidate class on a crop around it (CWR). See
docs/algorithms.md section 1. Two deliberate departures from the reference code:

* boxes keep the last patch row and column (the reference clips them to ``h-1``/``w-1``);
* CWR skips a class with an empty region and goes on (the reference stops at the first one).

``global_scores`` is plain CLIP's route, which a model whose class token knows more than its
patches is better served by (``TAG_SCORES=global``, docs/algorithms.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from worker.model import vit
from worker.model.bundle import ClipBundle


@dataclass(frozen=True)
class TagCLIPConfig:
    """Hyperparameters; the defaults are the paper's for ViT-B/16 (12 blocks)."""

    cwr_threshold: float = 0.5  # relative, over all refined patch scores: which classes get a crop
    cwr_weight: float = 0.5  # fused score = (1 - w) * local + w * crop
    cwr_max_classes: int | None = None  # crops per image at most, for the best-scoring candidates
    self_penalty: float = -100.0  # last block: added to off-diagonal attention logits
    cwr_penalty: float = -1000.0  # CWR: added where the class token may not look
    refine_layers: tuple[int, ...] | None = None  # default: the 3 blocks before the last (8, 9, 10)
    vote_min: int | None = None  # default: a third of the blocks (4 of 12)

    def layers(self, depth: int) -> tuple[tuple[int, ...], int]:
        """Refinement layers and vote count for a ViT of ``depth`` blocks."""
        refine = self.refine_layers or tuple(range(max(0, depth - 4), depth - 1)) or (0,)
        vote_min = self.vote_min if self.vote_min is not None else max(1, round(depth / 3))
        return refine, vote_min


@dataclass
class LocalScores:
    """One image after the local stage: what CWR needs to re-identify its classes."""

    pixels: Tensor  # [3, H, W], normalised
    grid: tuple[int, int]  # (h, w) patches
    patch_probs: Tensor  # [N, C] patch-level class probabilities, before DMAR
    patch_scores: Tensor  # [N, C] the same refined by DMAR
    scores: Tensor  # [C_fg] max over patches of the refined scores, before CWR


class AttentionVotes:
    """Accumulates DMAR's attention statistics block by block (two [B, N, N] tensors, not twelve)."""

    def __init__(self, refine_layers: tuple[int, ...]) -> None:
        self.refine_layers = refine_layers
        self.votes: Tensor | None = None
        self.refine_sum: Tensor | None = None

    def __call__(self, layer: int, attention: Tensor) -> None:
        patches = attention[:, 1:, 1:].float()
        above = (patches > patches.mean(dim=(1, 2), keepdim=True)).to(torch.int32)
        self.votes = above if self.votes is None else self.votes + above
        if layer in self.refine_layers:
            self.refine_sum = patches if self.refine_sum is None else self.refine_sum + patches

    def refined(self, vote_min: int) -> Tensor:
        """Mean attention of the refinement layers, kept where at least ``vote_min`` blocks agree."""
        assert self.votes is not None and self.refine_sum is not None, "no attention recorded"
        return self.refine_sum / len(self.refine_layers) * (self.votes >= vote_min)


def class_box_masks(scores: Tensor, grid: tuple[int, int]) -> Tensor:
    """[..., N, C] patch scores -> [..., N, C] 0/1 masks: per image and class, the union of the
    bounding boxes of the connected regions scoring above the class's mean (scores min-max
    normalised, 8-bit as in the reference). Boxes include their last row and column.

    All images and classes go through one connected-components call (each class's grid is a tile
    of one tall image, tiles apart by an empty row) and one box fill, with one copy off the device:
    this runs once per batch on the worker's main thread, not once per image and class."""
    h, w = grid
    values = scores.detach().float().cpu().numpy()
    lead, (n, classes) = values.shape[:-2], values.shape[-2:]
    values = values.reshape(-1, n, classes).transpose(0, 2, 1).reshape(-1, n)  # [tiles, N]
    shifted = values - values.min(axis=1, keepdims=True)
    top = shifted.max(axis=1, keepdims=True)
    normalised = np.divide(shifted, top, out=np.zeros_like(shifted), where=top > 0)
    level = np.floor(normalised.mean(axis=1, keepdims=True) * 255)
    foreground = (np.floor(normalised * 255) > level) & (top > 0)
    tiles = np.zeros((len(values), h + 1, w), dtype=np.uint8)  # the last row of each tile stays empty
    tiles[:, :h] = foreground.reshape(-1, h, w)
    count, _, stats, _ = cv2.connectedComponentsWithStats(tiles.reshape(-1, w), connectivity=8)
    x, y, bw, bh = (stats[1:count, i] for i in range(4))
    tile, y = np.divmod(y, h + 1)
    # Paint every box at once: +1/-1 at its corners, then running sums over rows and columns.
    corners = np.zeros((len(values), h + 1, w + 1), dtype=np.int32)
    for dy, dx, sign in ((0, 0, 1), (0, bw, -1), (bh, 0, -1), (bh, bw, 1)):
        np.add.at(corners, (tile, y + dy, x + dx), sign)
    boxes = corners.cumsum(axis=1).cumsum(axis=2)[:, :h, :w] > 0
    out = boxes.reshape(-1, classes, n).transpose(0, 2, 1).reshape(*lead, n, classes)
    return torch.from_numpy(out.astype(np.float32)).to(scores.device)


def dmar(patch_probs: Tensor, refined_attention: Tensor, grid: tuple[int, int]) -> Tensor:
    """Dual-masking attention refinement: [..., N, C] -> [..., N, C] (one image or a batch).

    Patch scores propagate along refined attention, then again with each class's attention
    restricted to the boxes where that class is strong."""
    coarse = refined_attention @ patch_probs
    boxes = class_box_masks(coarse, grid)
    return refined_attention @ (boxes * patch_probs)


def class_region(class_scores: Tensor, grid: tuple[int, int]) -> tuple[tuple[int, int, int, int], Tensor] | None:
    """CWR's region for one class: patches over half the class's normalised range, and their tight
    box (y0, y1, x0, x1) in patch units, end-exclusive. None when no patch qualifies."""
    s = class_scores.float() - class_scores.min()
    top = s.max()
    if top <= 0:
        return None
    mask = (s / top > 0.5).reshape(grid)
    if not bool(mask.any()):
        return None
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    box = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
    return box, mask


def cls_attention_mask(region: Tensor, penalty: float) -> Tensor:
    """[h*w] booleans -> additive [L, L] mask letting the class token see only ``region`` patches
    (and itself); patch tokens attend as usual."""
    L = region.numel() + 1
    mask = torch.zeros(L, L, device=region.device)
    mask[0, 1:] = torch.where(region, 0.0, penalty)
    return mask


def crop_inputs(
    pixels: Tensor, box: tuple[int, int, int, int], region: Tensor, patch: int, grid: tuple[int, int],
    penalty: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The CWR crop resized to the model's native input (on the pixels' device), and its class-token
    mask (on the region's)."""
    y0, y1, x0, x1 = box
    crop = pixels[:, y0 * patch : y1 * patch, x0 * patch : x1 * patch]
    size = (grid[0] * patch, grid[1] * patch)
    crop = F.interpolate(crop[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    small = F.interpolate(region[y0:y1, x0:x1][None, None].float(), size=grid, mode="nearest")[0, 0]
    return crop.to(pixels.dtype), cls_attention_mask(small.flatten() > 0.5, penalty)


def full_precision(device: torch.device):
    """Scores, softmaxes and DMAR in fp32 even under autocast: only the ViT trunk runs in bf16."""
    return torch.autocast(device.type, enabled=False)


def class_probabilities(features: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """Softmax over classes of scaled cosine similarities; ``features`` [..., E] normalised."""
    return (logit_scale * features.float() @ text.float().T).softmax(dim=-1)


def global_scores(embeddings: Tensor, text: Tensor, n_fg: int, logit_scale: float) -> Tensor:
    """Tag scores from the images' global embeddings (``TAG_SCORES=global``), the alternative to
    TagCLIP's local route: [B, E] normalised embeddings -> [B, n_fg].

    Each label competes with the competitors alone (``text`` rows from ``n_fg`` on: background
    words, distractors), not with the other labels: ``p_c = exp(z_c) / (exp(z_c) + sum_k exp(z_k))``
    over competitors k. Labels shown together so do not split one probability, as they would in a
    softmax over every class, and other labels do not compete for a label's score (though a
    competitor too close to any label is left out, ``vocabulary.distinct_competitors``).
    Without competitors, the labels share a softmax. In fp32 even under autocast."""
    with full_precision(embeddings.device):
        logits = logit_scale * embeddings.float() @ text.float().T
        if text.shape[0] == n_fg:
            return logits.softmax(dim=-1)
        rest = logits[:, n_fg:].logsumexp(dim=-1, keepdim=True)
        return torch.sigmoid(logits[:, :n_fg] - rest)


@dataclass
class Trunk:
    """Blocks 0..L-2 of a batch of same-size images, run once: TagCLIP and the dense head each
    finish it with their own variant of the last block."""

    pixels: Tensor  # [B, 3, H, W], normalised
    tokens: Tensor  # [B, 1 + h*w, D], the input of the last block
    grid: tuple[int, int]
    votes: AttentionVotes  # attention statistics of the blocks run so far


@torch.no_grad()
def run_trunk(bundle: ClipBundle, pixels: Tensor, cfg: TagCLIPConfig) -> Trunk:
    visual = bundle.visual
    depth = len(visual.transformer.resblocks)
    votes = AttentionVotes(cfg.layers(depth)[0])
    tokens = vit.trunk(visual, pixels, observer=votes)
    return Trunk(pixels, tokens, vit.patch_grid(visual, pixels), votes)


@torch.no_grad()
def tagclip_head(bundle: ClipBundle, trunk: Trunk, text: Tensor, n_fg: int, cfg: TagCLIPConfig) -> list[LocalScores]:
    """The local stage on a trunk: self-attending last block, patch classification, DMAR.
    ``text`` [C, E] holds the ``n_fg`` project classes first, then background words."""
    visual = bundle.visual
    depth = len(visual.transformer.resblocks)
    last = visual.transformer.resblocks[depth - 1]
    x = vit.self_attending_block(last, trunk.tokens, cfg.self_penalty, observe=lambda a: trunk.votes(depth - 1, a))
    features = vit.project(visual, x)[:, 1:]
    out = []
    with full_precision(trunk.pixels.device):
        probs = class_probabilities(features, text, bundle.logit_scale)  # [B, N, C]
        refined = dmar(probs, trunk.votes.refined(cfg.layers(depth)[1]), trunk.grid)
        scores = refined[:, :, :n_fg].amax(dim=1)
        for b in range(trunk.pixels.shape[0]):
            out.append(LocalScores(trunk.pixels[b], trunk.grid, probs[b], refined[b], scores[b]))
    return out


def local_scores(bundle: ClipBundle, pixels: Tensor, text: Tensor, n_fg: int, cfg: TagCLIPConfig) -> list[LocalScores]:
    """TagCLIP's local stage for a batch of same-size images [B, 3, H, W], trunk included."""
    return tagclip_head(bundle, run_trunk(bundle, pixels, cfg), text, n_fg, cfg)


def candidates(scores: Tensor, threshold: Tensor, limit: int | None) -> list[int]:
    """The classes CWR re-identifies: those scoring over ``threshold``, best first, at most ``limit``
    (each costs a forward pass; a photo rarely holds more than a few real candidates)."""
    above = torch.nonzero(scores > threshold).flatten()
    ranked = above[scores[above].argsort(descending=True)].tolist()
    return ranked[:limit] if limit is not None else ranked


@torch.no_grad()
def reidentify(
    bundle: ClipBundle, images: list[LocalScores], text: Tensor, cfg: TagCLIPConfig, batch_size: int
) -> list[Tensor]:
    """Class-wise reidentification for all images at once: the crops of every candidate class of
    every image go through the model in batches. Returns the fused [C_fg] scores per image.

    Candidates, regions and class-token masks are worked out on the CPU from one copy of each
    image's scores (on a GPU, per-class decisions on device tensors would each wait for the GPU);
    only the crops are cut and resized on the device."""
    visual = bundle.visual
    patch, grid = vit.patch_size(visual), vit.native_grid(visual)
    fused = [item.scores.clone() for item in images]
    jobs: list[tuple[int, int]] = []
    crops, masks = [], []
    for i, item in enumerate(images):
        scores, patch_scores = item.scores.float().cpu(), item.patch_scores.float().cpu()
        lo, hi = patch_scores.min(), patch_scores.max()
        threshold = lo + cfg.cwr_threshold * (hi - lo)
        for c in candidates(scores, threshold, cfg.cwr_max_classes):
            found = class_region(patch_scores[:, c], item.grid)
            if found is None:
                continue  # the reference stops CWR here; other classes still deserve their crop
            crop, mask = crop_inputs(item.pixels, found[0], found[1], patch, grid, cfg.cwr_penalty)
            jobs.append((i, c))
            crops.append(crop)
            masks.append(mask)
    for start in range(0, len(jobs), batch_size):
        batch = torch.stack(crops[start : start + batch_size])
        mask = torch.stack(masks[start : start + batch_size])[:, None].to(batch.device)  # [K, 1, L, L], all heads
        cls = vit.encode_tokens(visual, batch, attn_mask=mask)[:, 0]
        with full_precision(cls.device):
            probs = class_probabilities(F.normalize(cls.float(), dim=-1), text, bundle.logit_scale)
            for k, (i, c) in enumerate(jobs[start : start + batch_size]):
                fused[i][c] = (1 - cfg.cwr_weight) * fused[i][c] + cfg.cwr_weight * probs[k, c]
    return fused
