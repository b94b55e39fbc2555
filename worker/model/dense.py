"""Training-free dense CLIP segmentation on TagCLIP's trunk (docs/algorithms.md section 3).

CLIP's last block mixes every patch with the whole image, which blurs where things are. The
dense heads replace only that block, on the tokens the trunk already computed:

* ClearCLIP: query-query attention, no residual, no feed-forward;
* NACLIP: key-key attention plus a Gaussian bonus for nearby patches, no residual, no FFN;
* MaskCLIP (the baseline they improve on): each token attends only to itself (the value path),
  residual and FFN kept.

Patch features are then compared with the class texts at a logit scale of about 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor

from worker.model import vit

#: The heads ``dense_block`` knows (``DENSE_HEAD`` picks one; ``common.settings`` lists the same).
HEADS = ("clearclip", "naclip", "maskclip")
#: CLIP's own temperature (100) makes patch-level softmaxes too peaky; the dense papers use ~50.
DENSE_LOGIT_SCALE = 50.0
#: Probability maps are computed at most this large; masks are then scaled to the image size.
MAX_MASK_SIDE = 1024


def neighbourhood_bias(grid: tuple[int, int], sigma: float, device: torch.device) -> Tensor:
    """[L, L] additive attention bonus exp(-d^2 / 2 sigma^2) between patches at distance d
    (in patches); zero for the class token's row and column."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    gaussian = torch.exp(-torch.cdist(positions, positions).square() / (2 * sigma**2))
    return F.pad(gaussian, (1, 0, 1, 0))


def dense_block(
    block: ResidualAttentionBlock, x: Tensor, head: str, grid: tuple[int, int], sigma: float = 5.0
) -> Tensor:
    """The dense head's last block: attention output only (no residual, no FFN), except for the
    MaskCLIP baseline, which keeps both."""
    if head not in HEADS:
        raise ValueError(f"Unknown dense head {head!r}; choose one of {HEADS}.")
    q, k, v = vit.qkv(block, x)
    if head == "maskclip":
        return vit.finish_block(block, x, v)
    # No attention map is read here, so SDPA computes it (fused, no [B, H, L, L] tensor in memory).
    if head == "clearclip":
        attended = F.scaled_dot_product_attention(q, q, v)
    else:  # naclip
        bias = neighbourhood_bias(grid, sigma, x.device).to(k.dtype)
        attended = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
    return vit.merge_heads(block, attended)


def dense_features(visual: VisionTransformer, tokens: Tensor, grid: tuple[int, int], head: str) -> Tensor:
    """Trunk tokens [B, L, D] -> normalised patch embeddings [B, h*w, E] in the text space."""
    x = dense_block(visual.transformer.resblocks[-1], tokens, head, grid)
    return vit.project(visual, x)[:, 1:]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Where windows of ``window`` start along a side of ``length``, ``stride`` apart, the last one
    flush with the end (as ClearCLIP's and NACLIP's slide inference)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] + window >= length else [*starts, length - window]


def sliding_features(visual: VisionTransformer, pixels: Tensor, head: str, batch_size: int) -> Tensor:
    """ClearCLIP's and NACLIP's inference: windows of the model's native input (224 for a ViT-B/16)
    slid at half their side over the image, each window's dense features computed on its own
    (the whole trunk, at the positions the model was trained with), averaged where windows
    overlap (so the class logits are the mean of the windows' logits, as the papers average them).
    Pixels [B, 3, H, W] -> [B, h*w, E] on the image's patch grid, as ``dense_features``. Costs a
    trunk pass per window instead of sharing TagCLIP's."""
    B, _, H, W = pixels.shape
    p = vit.patch_size(visual)
    window = vit.native_grid(visual)[0] * p
    wy, wx = min(window, H), min(window, W)
    boxes = [(y, x) for y in window_starts(H, wy, window // 2) for x in window_starts(W, wx, window // 2)]
    crops = torch.cat([pixels[:, :, y : y + wy, x : x + wx] for y, x in boxes])  # window-major
    features = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        tokens = vit.trunk(visual, chunk)
        features.append(dense_features(visual, tokens, (wy // p, wx // p), head).float())
    per_window = torch.cat(features).reshape(len(boxes), B, wy // p, wx // p, -1)
    total = torch.zeros(B, H // p, W // p, per_window.shape[-1], device=pixels.device)
    count = torch.zeros(1, H // p, W // p, 1, device=pixels.device)
    for (y, x), f in zip(boxes, per_window, strict=True):
        total[:, y // p : (y + wy) // p, x // p : (x + wx) // p] += f
        count[:, y // p : (y + wy) // p, x // p : (x + wx) // p] += 1
    return (total / count).flatten(1, 2)  # a mean of features: class logits are then the windows' mean


def class_logits(
    features: Tensor, text: Tensor, grid: tuple[int, int], logit_scale: float = DENSE_LOGIT_SCALE
) -> Tensor:
    """[N, E] patch features x [K, E] texts -> [K, h, w] logits, contiguous (upsampling a strided
    view is 20x slower on CPU)."""
    logits = logit_scale * text.float() @ features.float().T
    return logits.reshape(text.shape[0], *grid)


@dataclass(frozen=True)
class Mask:
    """One class's region in an image: ``index`` into the classes segmented, a boolean mask at the
    working resolution of the probability maps, the image's size, and the mean probability of the
    class inside the mask. The region is kept small: drawing it at the image's size costs more
    than encoding it for Label Studio straight from here (``common.labelstudio.brush``)."""

    index: int
    region: np.ndarray  # [h, w] booleans, h and w at most MAX_MASK_SIDE
    size: tuple[int, int]  # (width, height) of the image
    score: float


def masks_from_logits(
    logits: Tensor,
    n_labels: int,
    image_size: tuple[int, int],
    min_area: float,
    activation: str = "softmax",
    floor: float = 0.0,
    image: Tensor | None = None,
) -> list[Mask]:
    """Upsample [K, h, w] logits to the image, give each pixel its best class, keep labels
    ``0..n_labels-1`` (the rest are competitors: background words, distractors), drop connected regions smaller than
    ``min_area`` of the image, and score each mask by its mean probability.

    ``activation`` is ``softmax`` (classes compete, as for CLIP similarities) or ``sigmoid``
    (independent scores, as ZegCLIP's); pixels whose best probability is under ``floor`` stay
    unlabeled. With ``image`` [3, H, W] (the pixels the model saw), the upsampled scores are
    refined along its edges (PAMR, as NACLIP) before each pixel is given its class.
    """
    width, height = image_size
    if activation == "softmax" and logits.shape[0] > n_labels + 1:
        # Competitors (background words, distractors) need only be beaten, not told apart: their
        # best logit per patch stands for all of them, so n_labels + 1 maps are upsampled, not
        # hundreds (each is up to MAX_MASK_SIDE^2 floats).
        logits = torch.cat([logits[:n_labels], logits[n_labels:].amax(dim=0, keepdim=True)])
    scale = min(1.0, MAX_MASK_SIDE / max(width, height))
    work = (max(1, round(height * scale)), max(1, round(width * scale)))
    upsampled = F.interpolate(logits.detach()[None].float(), size=work, mode="bilinear", align_corners=False)[0]
    if image is not None:
        picture = F.interpolate(image[None].float(), size=work, mode="bilinear", align_corners=False)[0]
        upsampled = pamr(picture.to(upsampled.device), upsampled)
    probs = upsampled.softmax(dim=0) if activation == "softmax" else upsampled.sigmoid()
    best, label = probs.max(dim=0)
    # Two maps leave the device, not one per class: inside a class's mask, its probability is the best.
    label = torch.where(best >= floor, label, -1).to(torch.int16).cpu().numpy()
    best = best.cpu().numpy()
    smallest = min_area * work[0] * work[1]
    masks = []
    for c in range(n_labels):
        region = _drop_small_regions(label == c, smallest)
        if not region.any():
            continue
        score = float(best[region].mean())
        masks.append(Mask(c, region, (width, height), score))
    return masks


#: PAMR (Araslanov and Roth, 2020) as NACLIP runs it: 10 iterations over neighbours at these dilations.
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)


def _neighbours(x: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """[B, C, H, W] -> [B, C, 8 * len(dilations), H, W]: each pixel's 8 neighbours at each dilation
    (replicated at the border)."""
    shifted = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        h, w = x.shape[-2:]
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    shifted.append(padded[..., d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.stack(shifted, dim=2)


def pamr(image: Tensor, logits: Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: tuple[int, ...] = PAMR_DILATIONS) -> Tensor:  # fmt: skip
    """Pixel-adaptive mask refinement: [K, H, W] scores averaged, ``iterations`` times, over each
    pixel's neighbours weighted by how alike their colours are in ``image`` [3, H, W]; masks
    snap to the image's edges. Affinities: softmax over neighbours of -|colour difference| /
    (0.1 * local colour spread), averaged over the colour channels."""
    x = image[None].float()
    near = _neighbours(x, dilations)  # [1, 3, P, H, W]
    spread = near.std(dim=2, keepdim=True)
    affinity = (-(near - x[:, :, None]).abs() / (1e-8 + 0.1 * spread)).mean(dim=1, keepdim=True)
    affinity = affinity.softmax(dim=2)  # [1, 1, P, H, W]
    scores = logits[None].float()
    for _ in range(iterations):
        scores = (_neighbours(scores, dilations) * affinity).sum(dim=2)
    return scores[0]


def _drop_small_regions(mask: np.ndarray, smallest: float) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[1:count, cv2.CC_STAT_AREA] >= smallest
    if keep.all():
        return mask  # the usual case: nothing to drop
    return np.r_[False, keep][labels]
