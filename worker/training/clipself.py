"""CLIPSelf fine-tuning of the CLIP ViT on a project's corrections (docs/algorithms.md section 5).

CLIP's image embedding is good, its patch features less so; CLIPSelf makes the dense features of
a region agree with what the frozen model says about that region cropped out. On top of that
self-distillation we add what annotators told us:

    L = L_self + sup_weight * L_sup + pix_weight * L_pix + global_weight * L_global

* D: the dense features of ``cfg.dense_head``'s last block on blocks 0..L-2. The paper trains
  MaskCLIP's value path (residual and FFN kept, the config's default); the service passes its
  ``DENSE_HEAD`` (ClearCLIP by default, no residual, no FFN), so training changes the features
  masks are served from (a deliberate departure, docs/algorithms.md). With ``tag_path`` the
  MaskCLIP path trains too, each term averaged over both: TagCLIP's local stage reads it (a last
  block whose patches attend to themselves);
* L_self: 1 - cos(RoIAlign(D, box), teacher(crop)) for each corrected region's box and each
  corrected RectangleLabels box (teacher crop with 1.5x context) and a few random grid cells
  (exact crops);
* L_sup: mask-pooled dense features classified (x100, cross-entropy) against the project's
  labels and background words, whose text embeddings stay frozen so the vocabulary stays open;
  a corrected box is a weak label, pooled over the whole box; for corrected tags without masks
  or boxes, the best patch per tag (multiple-instance) instead;
* L_pix: per-patch cross-entropy against the corrected mask, on labelled patches;
* L_global: 1 - cos(student's image embedding, teacher's) of each training image. The trained
  blocks also carry the class token that TagCLIP's re-identification and the few-shot tag cache
  read; CLIPSelf does not need it, prelabel does, so it is held where the base model had it.

The student sees each corrected image through a random square crop, side its short side, resized
to ``size`` (``view="crop"``): the paper letterboxes (longest side resized, black padding), which
trains on padding the service never serves and lost 0.14 mIoU on wide toy corrections
(docs/algorithms.md section 5); ``view="letterbox"`` keeps the paper's.

Only the last blocks train (from ``trainable_from`` of the depth: 6..11 of 12); patch embedding,
positions, class token, ln_pre, ln_post and proj stay frozen. What is saved is the ensemble
``alpha * student + (1 - alpha) * start`` of the trained blocks.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from worker.model import vit
from worker.model.dense import dense_block
from worker.model.preprocess import to_pixels
from worker.regions import box
from worker.training.corrections import Correction
from worker.training.loop import Progress, ShouldStop, TrainingReport, decay_groups, train


@dataclass(frozen=True)
class CLIPSelfConfig:
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-5  # the paper's; small models and short runs want more
    weight_decay: float = 0.1
    trainable_from: float = 0.5  # first trainable block, as a fraction of the depth
    sup_weight: float = 0.5
    pix_weight: float = 0.1
    grid_cells: int = 10  # random grid-cell regions per image
    context: float = 1.5  # teacher crops of corrected regions are this much larger
    alpha: float = 0.7
    max_boxes: int = 8  # corrected boxes (weak labels) used per image and step
    size: int = 448  # the student's square input side
    view: str = "crop"  # how an image becomes that square: VIEWS (the paper: "letterbox")
    dense_head: str = "maskclip"  # the dense path trained: CLIPSelf's; the service passes DENSE_HEAD
    tag_path: bool = True  # also train the MaskCLIP path, which TagCLIP's local stage reads
    global_weight: float = 1.0  # weight of L_global (0: the class token is free to drift)


#: "crop": a random square of the image, side its short side, resized to the square (the corrected
#: mask and boxes follow it; corrections without a mask, whose tags may lie outside any crop, stay
#: letterboxed); "letterbox": the longest side resized to the square, black padding (the paper's).
VIEWS = ("crop", "letterbox")


def trainable_blocks(visual: VisionTransformer, cfg: CLIPSelfConfig) -> range:
    depth = len(visual.transformer.resblocks)
    return range(min(depth - 1, int(depth * cfg.trainable_from)), depth)


def block_state(visual: VisionTransformer, blocks: range) -> dict[str, Tensor]:
    """The weights of ``blocks``, keyed as in ``visual.state_dict()`` (a version's weights file)."""
    prefixes = tuple(f"transformer.resblocks.{i}." for i in blocks)
    return {k: v.detach().clone() for k, v in visual.state_dict().items() if k.startswith(prefixes)}


def student_outputs(visual: VisionTransformer, pixels: Tensor, heads: Sequence[str]) -> tuple[list[Tensor], Tensor]:
    """One trunk pass (blocks 0..L-2) for all of the student's outputs: the dense features of each
    of ``heads``' last block [B, E, h, w] and the plain last block's image embedding [B, E], each
    L2-normalised."""
    last = visual.transformer.resblocks[-1]
    x = vit.trunk(visual, pixels)
    grid = vit.patch_grid(visual, pixels)
    maps = []
    for head in heads:
        features = vit.project(visual, dense_block(last, x, head, grid))[:, 1:]
        maps.append(features.transpose(1, 2).reshape(pixels.shape[0], -1, *grid))
    embedding = vit.project(visual, vit.block_forward(last, x))[:, 0]
    return maps, embedding


def trained_paths(cfg: CLIPSelfConfig) -> tuple[str, ...]:
    """The dense paths a run trains: the served head's, and TagCLIP's (MaskCLIP's) with ``tag_path``."""
    return tuple(dict.fromkeys((cfg.dense_head, *(("maskclip",) if cfg.tag_path else ()))))


def grid_cells(rng: random.Random, count: int) -> list[tuple[float, float, float, float]]:
    """CLIPSelf's random grid split: m rows x n columns, boxes (x0, y0, x1, y1) in [0, 1]."""
    m = rng.randint(1, 6)
    n = rng.randint((m + 1) // 2, min(2 * m, 6))
    cells = [(j / n, i / m, (j + 1) / n, (i + 1) / m) for i in range(m) for j in range(n)]
    rng.shuffle(cells)
    return cells[:count]


def region_boxes(mask: np.ndarray) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(label k, box in [0, 1]) for each label present in a corrected mask."""
    height, width = mask.shape
    out = []
    for k in sorted(set(np.unique(mask).tolist()) - {0, 255}):
        x0, y0, x1, y1 = box(mask == k)
        out.append((k, (x0 / width, y0 / height, x1 / width, y1 / height)))
    return out


def _enlarge(box: tuple[float, float, float, float], factor: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * factor, (y1 - y0) * factor
    return max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(1.0, cx + w / 2), min(1.0, cy + h / 2)


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions


def black(count: int, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[count, 3, size, size] black pixels, normalised (CLIPSelf pads with zeros before normalising)."""
    value = (0 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return value[None, :, None, None].expand(count, 3, size, size).clone()


def letterbox(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Box]:
    """CLIPSelf's student input: the longest side resized to ``size`` (bicubic, aspect kept), black
    at the bottom and right. Returns the pixels [3, size, size] and the part of the canvas the image
    covers, as a box."""
    width, height = image.size
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = black(1, size, mean, std)[0]
    canvas[:, :h, :w] = to_pixels(image, (w, h), mean, std)
    return canvas, (0.0, 0.0, w / size, h / size)


def square_crop(correction: Correction, rng: random.Random) -> Correction:
    """The correction seen through a random square of its image, side the image's short side: its
    image, mask and boxes cut to that square (boxes clipped, and dropped when outside it). A square
    image, or a correction without a mask, is returned as it is: its tags (and the tags of boxes a
    crop would drop) would be trained as present in a crop that may not show them."""
    if correction.image is None or correction.mask is None or correction.mask.size == 0:
        return correction
    W, H = correction.image.size
    if W == H:  # the whole image (and the same random draws as a letterbox)
        return correction
    side = min(W, H)
    left, top = rng.randint(0, W - side), rng.randint(0, H - side)
    x0, y0, x1, y1 = left / W, top / H, (left + side) / W, (top + side) / H
    h, w = correction.mask.shape  # the image's size, or in proportion to it
    rows = slice(top * h // H, max(top * h // H + 1, (top + side) * h // H))
    columns = slice(left * w // W, max(left * w // W + 1, (left + side) * w // W))
    mask = np.ascontiguousarray(correction.mask[rows, columns])
    boxes = []
    for name, (bx0, by0, bx1, by1) in correction.boxes:
        inside = ((max(bx0, x0) - x0) / (x1 - x0), (max(by0, y0) - y0) / (y1 - y0),
                  (min(bx1, x1) - x0) / (x1 - x0), (min(by1, y1) - y0) / (y1 - y0))  # fmt: skip
        if inside[0] < inside[2] and inside[1] < inside[3]:
            boxes.append((name, inside))
    image = correction.image.crop((left, top, left + side, top + side))
    return replace(correction, image=image, mask=mask, boxes=boxes)


def teacher_crops(
    image: Image.Image, boxes: Sequence[Box], size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """Crops of the original image (boxes as fractions of it), each resized (bicubic) so that its
    longest side is ``size`` and centred on black, as CLIPSelf feeds its teacher: [K, 3, size, size]."""
    W, H = image.size
    out = black(len(boxes), size, mean, std)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        left, top = min(W - 1, int(x0 * W)), min(H - 1, int(y0 * H))
        crop = image.crop((left, top, max(left + 1, math.ceil(x1 * W)), max(top + 1, math.ceil(y1 * H))))
        scale = size / max(crop.size)
        w, h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
        oy, ox = (size - h) // 2, (size - w) // 2
        out[k, :, oy : oy + h, ox : ox + w] = to_pixels(crop, (w, h), mean, std)
    return out


def to_canvas(box: Box, cover: Box) -> Box:
    """A box in fractions of the image -> fractions of the letterboxed canvas covering ``cover``."""
    fx, fy = cover[2], cover[3]
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy


def from_canvas(box: Box, cover: Box) -> Box:
    fx, fy = cover[2], cover[3]
    return box[0] / fx, box[1] / fy, min(1.0, box[2] / fx), min(1.0, box[3] / fy)


def _patch_targets(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """The corrected label at each patch centre (0 none, 255 unknown)."""
    image = Image.fromarray(mask).resize((grid[1], grid[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(image).astype(np.int64))


def _area_weights(mask: np.ndarray, label: int, grid: tuple[int, int]) -> Tensor:
    """The share of each patch covered by ``label`` ([h, w], for mask pooling)."""
    region = torch.from_numpy((mask == label).astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(region, grid)[0, 0]


def train_clipself(
    student: VisionTransformer,
    teacher: VisionTransformer,
    corrections: Sequence[Correction],
    text: Tensor,
    label_index: dict[str, int],
    mean: Sequence[float],
    std: Sequence[float],
    cfg: CLIPSelfConfig,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    seed: int = 0,
) -> tuple[dict[str, Tensor], TrainingReport]:
    """Fine-tune a copy of ``student`` on ``corrections`` (with images) and return the weights of
    its trained blocks (the alpha ensemble) and a report. ``text`` [C, E] holds the classes
    L_sup and L_pix choose among; ``label_index`` maps a label name to its row.

    Neither argument is modified: the student trains on a copy, the teacher stays frozen.
    """
    if cfg.view not in VIEWS:
        raise ValueError(f"CLIPSelf view {cfg.view!r} is not one of {', '.join(VIEWS)}.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = text.device
    start = copy.deepcopy(student).to(device)
    model = copy.deepcopy(student).to(device).train()
    blocks = trainable_blocks(model, cfg)
    model.requires_grad_(False)
    params = [p for i in blocks for p in model.transformer.resblocks[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    teacher = teacher.to(device).eval()
    native = vit.native_grid(teacher)[0] * vit.patch_size(teacher)
    with_images = [c for c in corrections if c.image is not None]
    if not with_images:
        raise ValueError("CLIPSelf needs corrections with their images.")

    def batch_loss(step: int) -> Tensor:
        batch = [rng.choice(with_images) for _ in range(cfg.batch_size)]
        if cfg.view == "crop":
            batch = [square_crop(c, rng) for c in batch]
        return _loss(model, teacher, batch, text, label_index, mean, std, cfg, native, rng)

    report = train(batch_loss, decay_groups(params, cfg.weight_decay), cfg.steps, cfg.lr, "cosine", progress,
                   should_stop)  # fmt: skip
    trained, initial = block_state(model, blocks), block_state(start, blocks)
    ensemble = {k: cfg.alpha * trained[k] + (1 - cfg.alpha) * initial[k] for k in trained}
    return {k: v.cpu() for k, v in ensemble.items()}, report


def _loss(model, teacher, batch, text, label_index, mean, std, cfg, native, rng) -> Tensor:
    device = text.device
    boxed = [letterbox(c.image, cfg.size, mean, std) for c in batch]
    pixels = torch.stack([pixels for pixels, _ in boxed]).to(device)
    maps, embedding = student_outputs(model, pixels, trained_paths(cfg))  # each [B, E, h, w]; [B, E]
    grid = tuple(maps[0].shape[-2:])
    rois, teacher_inputs, sup_terms, pix_terms = [], [], [], []
    for b, correction in enumerate(batch):
        cover = boxed[b][1]
        mask = _canvas_mask(correction, cfg.size, cover)
        regions = [(k, from_canvas(box, cover)) for k, box in region_boxes(mask)] if mask is not None else []
        weak = [(name, b) for name, b in correction.boxes if name in label_index and b[0] < b[2] and b[1] < b[3]]
        if len(weak) > cfg.max_boxes:  # a few per image and step: each is a teacher pass
            weak = rng.sample(weak, cfg.max_boxes)
        corrected = [box for _, box in regions] + [box for _, box in weak]  # fractions of the image
        image_boxes = corrected + grid_cells(rng, cfg.grid_cells)
        crops = [_enlarge(box, cfg.context) for box in corrected] + image_boxes[len(corrected) :]
        teacher_inputs.append(teacher_crops(correction.image, crops, native, mean, std).to(device))
        student_boxes = [to_canvas(box, cover) for box in image_boxes]
        rois += [[b, x0 * grid[1], y0 * grid[0], x1 * grid[1], y1 * grid[0]] for x0, y0, x1, y1 in student_boxes]
        # What the corrections say, once per image; each trained path is then held to it.
        pooling = []  # (patch weights [h, w], class row): a region's or a box's features, pooled
        labelled = None  # [h*w] class row of each patch of a corrected mask (-100: none known)
        if mask is not None:
            for k, _ in regions:
                name = correction.mask_labels[k - 1]
                pooling.append((_area_weights(mask, k, grid).to(device), label_index[name]))
            lookup = torch.full((256,), -100, dtype=torch.long, device=device)
            for k, name in enumerate(correction.mask_labels, start=1):
                lookup[k] = label_index[name]
            labelled = lookup[_patch_targets(mask, grid).to(device).flatten()]
            labelled = labelled if (labelled >= 0).any() else None
        for name, extent in weak:  # a box says its label is inside it: pooled over the box
            pooling.append((_box_weights(to_canvas(extent, cover), grid).to(device), label_index[name]))
        candidates = []  # tags with no region: the tag against the absent classes, at their best patch
        unboxed = [t for t in correction.all_tags if t not in {name for name, _ in weak}]
        if mask is None and unboxed:
            present = [label_index[t] for t in correction.all_tags if t in label_index]
            absent = [i for i in range(text.shape[0]) if i not in present]
            candidates = [torch.tensor([label_index[t], *absent], device=device) for t in unboxed if t in label_index]
        first = torch.zeros(1, dtype=torch.long, device=device)  # the present tag is candidate 0
        for features in (dense[b] for dense in maps):  # [E, h, w] of each trained path
            sup_terms += [_pooled_term(features, weights, text, row) for weights, row in pooling]
            if labelled is not None or candidates:
                logits = 50 * features.flatten(1).T @ text.T  # [h*w, C]
            if labelled is not None:
                pix_terms.append(F.cross_entropy(logits, labelled, ignore_index=-100))
            if candidates:  # multiple-instance: the best patch per class
                best = logits.max(dim=0).values
                sup_terms += [F.cross_entropy(best[c][None], first) for c in candidates]
    with torch.no_grad():
        targets = F.normalize(vit.encode_tokens(teacher, torch.cat(teacher_inputs))[:, 0].float(), dim=-1)
        held = F.normalize(vit.encode_tokens(teacher, pixels)[:, 0].float(), dim=-1) if cfg.global_weight else None
    boxes = torch.tensor(rois, dtype=torch.float32, device=device)
    pooled = [roi_align(dense.float(), boxes, (1, 1), aligned=True).flatten(1) for dense in maps]
    loss = torch.stack([1 - F.cosine_similarity(p, targets, dim=-1).mean() for p in pooled]).mean()  # L_self
    if sup_terms:
        loss = loss + cfg.sup_weight * torch.stack(sup_terms).mean()
    if pix_terms:
        loss = loss + cfg.pix_weight * torch.stack(pix_terms).mean()
    if held is not None:
        loss = loss + cfg.global_weight * (1 - F.cosine_similarity(embedding.float(), held, dim=-1).mean())
    return loss


def _pooled_term(features: Tensor, weights: Tensor, text: Tensor, row: int) -> Tensor:
    """Cross-entropy (x100) of the features pooled with ``weights`` [h, w] against class ``row``."""
    pooled = F.normalize((features * weights).sum((1, 2)) / weights.sum().clamp(min=1e-6), dim=0)
    return F.cross_entropy(100 * pooled @ text.T, torch.tensor(row, device=text.device))


def _box_weights(box: tuple[float, float, float, float], grid: tuple[int, int]) -> Tensor:
    """The share of each patch [h, w] a box (x0, y0, x1, y1 as fractions) covers."""
    x0, y0, x1, y1 = box
    h, w = grid

    def overlap(lo: float, hi: float, n: int) -> Tensor:
        edges = torch.arange(n + 1, dtype=torch.float32) / n
        return (edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp(min=0) * n

    return overlap(y0, y1, h)[:, None] * overlap(x0, x1, w)[None, :]


def _canvas_mask(correction: Correction, size: int, cover: Box) -> np.ndarray | None:
    """The corrected mask on the letterboxed canvas; the padding is unknown (255)."""
    if correction.mask is None or correction.mask.size == 0:
        return None
    w, h = round(cover[2] * size), round(cover[3] * size)
    canvas = np.full((size, size), 255, dtype=np.uint8)
    canvas[:h, :w] = np.asarray(Image.fromarray(correction.mask).resize((w, h), Image.Resampling.NEAREST))
    return canvas
