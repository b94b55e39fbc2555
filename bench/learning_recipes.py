"""The learning recipes, measured on the toy world: which dense path CLIPSelf trains, whether it
holds the class token, and how a ZegCLIP head is scheduled and given its "no label" floor.

    python -m bench.learning_recipes --k 50 --steps 100 --seeds 2 --scenes 100
    python -m bench.learning_recipes --parts zegclip --passes 120 240 480   # the ZegCLIP schedule alone

* CLIPSelf (with the service's supervised terms) on K corrected scenes, three ways: the paper's
  MaskCLIP value path; the path the service serves masks from (ClearCLIP); the served path with
  the class token held (the service). Figures: ClearCLIP mask mIoU (sliding windows, the classes
  each scene holds, so tags do not blur it), TagCLIP's tag mAP (DMAR + CWR: its re-identification
  reads the class token) and the global embedding's mAP.
* A ZegCLIP head on the base ViT, trained on the same K scenes: a fixed 300 steps (the old
  TRAIN_STEPS) on all of them with its floor set on its own training masks; on four fifths with
  the floor set on those or on the fifth kept aside; 30 and 120 passes over the four fifths.
  Figure: mask mIoU (the classes each scene holds).

* ``--parts views heads``: the papers' recipes against what prelabel did before and does now, the
  old ones rebuilt here (and only here) to be measured. ``views``: CLIPSelf's student input
  letterboxed with teacher crops of the original (bicubic, black; the paper's), random square
  crops (``view="crop"``, the service's), or squashed to a square with teacher crops cut from
  that tensor (bilinear, grey padding; prelabel before), trained on wide corrections (the scenes'
  middle half, 2:1), where they differ; on square images they do not. ``heads``: ZegCLIP's head
  with or without a Linear + LayerNorm on the patch features (``use_proj``: off in both official
  configs, on in the service), and with a focal term averaged over every pixel of every class map
  instead of per mask present (``--heads`` picks some, ``--passes`` sets their schedule: 120
  passes by default).

Mean ± spread over seeds; each seed draws its own held-out and corrected scenes. Prints a
markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import quality as q
from bench.toyworld import Scene, crop, scenes
from common.quality import mean_average_precision, miou
from common.settings import Settings
from worker.checkpoints import version_visual
from worker.model.preprocess import to_pixels
from worker.model.zegclip import ZegCLIPConfig, one_hot_targets, segmentation_loss
from worker.training import clipself, zegclip
from worker.training.clipself import CLIPSelfConfig, train_clipself
from worker.training.corrections import Correction
from worker.training.zegclip import TrainingSample, calibrate_threshold, calibration_split, schedule, train_zegclip

CLIPSELF = {
    "CLIPSelf, MaskCLIP path (paper)": {"dense_head": "maskclip", "global_weight": 0.0, "tag_path": False},
    "CLIPSelf, served ClearCLIP path": {"dense_head": "clearclip", "global_weight": 0.0, "tag_path": False},
    "CLIPSelf, served path, class token held": {"dense_head": "clearclip", "global_weight": 1.0, "tag_path": False},
    "CLIPSelf, served + TagCLIP's paths, class token held (service)": {"dense_head": "clearclip", "global_weight": 1.0,
                                                                        "tag_path": True},
}  # fmt: skip
#: ZegCLIP heads: (masks trained on: all or four fifths, passes over them or None for the old fixed
#: 300 steps, floor set on: "training" masks or those kept "aside").
ZEGCLIP = (("all", None, "training"), ("four fifths", None, "training"), ("four fifths", None, "aside"),
           ("four fifths", 30, "aside"), ("four fifths", 120, "aside"))  # fmt: skip
PARTS = ("clipself", "zegclip", "views", "heads")
OLD_STEPS = 300  # TRAIN_STEPS, which ZegCLIP heads used to train for whatever the data
SERVICE = Settings()  # the service's defaults: ZEGCLIP_EPOCHS, ZEGCLIP_MAX_STEPS, TRAIN_HOLDOUT


#: ZegCLIP heads of the heads part: (projection on the patch features, focal averaged over every map)
ZEGCLIP_BEFORE = {"as the official configs": (False, False), "with the projection (served)": (True, False),
                  "with focal over every map": (False, True), "with both (prelabel before)": (True, True)}  # fmt: skip
#: CLIPSelf's student views of the views part: the service's (clipself.VIEWS) and the old squash
CLIPSELF_VIEWS = {"letterboxed (the paper's)": "letterbox", "square crops": "crop",
                  "squashed (prelabel before)": "squash"}  # fmt: skip
HEAD_PASSES = 120  # ZegCLIP passes in the heads part: 600 steps at 50 corrections, minutes on a CPU
WIDE = 2  # the wide corrections' aspect ratio (width : height)


def focal_over_every_map(logits: torch.Tensor, mask: torch.Tensor, cfg: ZegCLIPConfig) -> torch.Tensor:
    """The loss with its focal term divided by every class map of the batch (B x C) instead of the
    masks present: what averaging focal over every pixel of every map did (equal for maps of
    equally many valid pixels, as the training crops are)."""
    focal = segmentation_loss(logits, mask, dataclasses.replace(cfg, dice_weight=0.0))
    dice = segmentation_loss(logits, mask, dataclasses.replace(cfg, focal_weight=0.0))
    targets, valid = one_hot_targets(mask, logits.shape[1])
    present = ((targets * valid).flatten(2).sum(-1) > 0).sum().clamp(min=1)
    return focal * present / (logits.shape[0] * logits.shape[1]) + dice


@contextlib.contextmanager
def focal_over_maps() -> Iterator[None]:
    with mock.patch.object(zegclip, "segmentation_loss", focal_over_every_map):
        yield


@contextlib.contextmanager
def clipself_squashed(size: int) -> Iterator[None]:
    """CLIPSelf's inputs as prelabel made them before: the image squashed to ``size`` x ``size``,
    teacher crops cut from that tensor, resized bilinearly and centred on zeros (the mean colour)."""

    def student(image: Image.Image, side: int, mean, std):
        return to_pixels(image, (side, side), mean, std), (0.0, 0.0, 1.0, 1.0)

    def teacher(image: Image.Image, boxes, native: int, mean, std) -> torch.Tensor:
        pixels = to_pixels(image, (size, size), mean, std)
        out = torch.zeros(len(boxes), 3, native, native)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            top, left = int(y0 * size), int(x0 * size)
            part = pixels[:, top : max(top + 1, math.ceil(y1 * size)), left : max(left + 1, math.ceil(x1 * size))]
            scale = native / max(part.shape[1:])
            h, w = max(1, round(part.shape[1] * scale)), max(1, round(part.shape[2] * scale))
            oy, ox = (native - h) // 2, (native - w) // 2
            out[k, :, oy : oy + h, ox : ox + w] = F.interpolate(part[None], (h, w), mode="bilinear")[0]
        return out

    with mock.patch.object(clipself, "letterbox", student), mock.patch.object(clipself, "teacher_crops", teacher):
        yield


def corrections_of(chosen: Sequence[Scene], kind: str) -> list[Correction]:
    names = q.KINDS[kind]
    present = [s.colours if kind == "colour" else s.shapes for s in chosen]
    return [Correction(i, None, {"tags": set(p)}, s.class_map(kind).astype(np.uint8), names, s.image)
            for i, (s, p) in enumerate(zip(chosen, present, strict=True))]  # fmt: skip


def wide_views(seed: int, k: int) -> list[Scene]:
    """``k`` corrected views WIDE times wider than high (a band of a scene) that show an object."""
    rng = np.random.default_rng(seed)
    height = q.SIZE // WIDE
    bands = (crop(s, 0, int(rng.integers(0, q.SIZE - height + 1)), q.SIZE, height)
             for s in scenes(q.POOL_SEED + seed, 4 * k, q.SIZE, empty_rate=q.EMPTY_RATE))  # fmt: skip
    return [b for b in bands if b.objects][:k]


def figures(bench: q.Bench, held_out: list[Scene], kind: str) -> dict[str, float]:
    names = q.KINDS[kind]
    truth, scores = q.truth_tags(held_out, kind), q.tag_scores(bench, held_out, kind)
    maps = q.dense_maps(bench, held_out, kind, "clearclip", truth, sliding=True)
    return {
        "ClearCLIP mIoU": miou(maps, [s.class_map(kind) for s in held_out], len(names)),
        "TagCLIP mAP": mean_average_precision(scores["dmar+cwr"], truth),
        "global mAP": mean_average_precision(scores["global"], truth),
    }


def clipself_figures(
    bench: q.Bench, options: dict, corrections: list[Correction], held_out: list[Scene], kind: str, steps: int,
    lr: float, seed: int,
) -> dict[str, float]:  # fmt: skip
    """``figures`` of the model CLIPSelf (with ``options``) trained on ``corrections``."""
    names = q.KINDS[kind]
    text, index = bench.class_text(names), {n: i for i, n in enumerate(names)}
    cfg = CLIPSelfConfig(steps=steps, batch_size=8, lr=lr, size=bench.input_size, **options)
    weights, _ = train_clipself(bench.bundle.visual, bench.bundle.visual, corrections, text, index,
                                bench.bundle.mean, bench.bundle.std, cfg, seed=seed)  # fmt: skip
    tuned = dataclasses.replace(bench.bundle, visual=version_visual(bench.bundle.visual, weights))
    return figures(dataclasses.replace(bench, bundle=tuned), held_out, kind)


def head_miou(
    bench: q.Bench, samples: list, aside: list, held_out: list[Scene], kind: str, steps: int, seed: int,
    project_patches: bool = ZegCLIPConfig.project_patches,
):  # fmt: skip
    names = list(q.KINDS[kind])
    heads = 8 if bench.bundle.visual.output_dim % 8 == 0 else 4
    cfg = ZegCLIPConfig(decoder_heads=heads, project_patches=project_patches)
    head, _ = train_zegclip(bench.bundle, samples, names, cfg, steps=steps, lr=1e-3, size=bench.input_size, seed=seed)
    calibrate_threshold(bench.bundle, head, aside, names, bench.input_size)
    maps = q.zegclip_maps(bench, head, held_out, q.truth_tags(held_out, kind), kind)
    return miou(maps, [s.class_map(kind) for s in held_out], len(names)), head.cfg.mask_threshold


def measure(
    bench: q.Bench, kind: str, k: int, steps: int, lr: float, n_scenes: int, seeds: int, parts: Sequence[str] = PARTS,
    passes: Sequence[int] = (), heads: Sequence[str] = tuple(ZEGCLIP_BEFORE),
) -> dict:  # fmt: skip
    names = q.KINDS[kind]
    rows: dict[str, list[float]] = {}

    def add(row: str, value: float) -> None:
        rows.setdefault(row, []).append(value)

    for seed in range(seeds):
        held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
        chosen = [s for s in scenes(q.POOL_SEED + seed, 2 * k, q.SIZE, empty_rate=q.EMPTY_RATE) if s.objects][:k]
        corrections = corrections_of(chosen, kind)
        for name, value in figures(bench, held_out, kind).items():
            add(f"base model: {name}", value)
        for label, options in CLIPSELF.items() if "clipself" in parts else ():
            for name, value in clipself_figures(bench, options, corrections, held_out, kind, steps, lr, seed).items():
                add(f"{label}: {name}", value)
        if "views" in parts:
            wide = corrections_of(wide_views(seed, k), kind)
            service = {"dense_head": SERVICE.dense_head}
            for label, view in CLIPSELF_VIEWS.items():
                squashed = view == "squash"
                options = {**service, "view": "letterbox" if squashed else view}
                with clipself_squashed(bench.input_size) if squashed else contextlib.nullcontext():
                    measured = clipself_figures(bench, options, wide, held_out, kind, steps, lr, seed)
                for name, value in measured.items():
                    add(f"CLIPSelf on wide corrections, {label}: {name}", value)
        samples = [TrainingSample(s.image, s.class_map(kind).astype(np.uint8), names) for s in chosen]
        train, aside = calibration_split(samples, SERVICE.train_holdout)
        schedules = (ZEGCLIP if not passes else ()) + tuple(("four fifths", n, "aside") for n in passes)
        for masks, count, floor_on in schedules if "zegclip" in parts else ():
            fit = samples if masks == "all" else train
            head_steps = OLD_STEPS if count is None else schedule(len(fit), count, SERVICE.zegclip_max_steps)
            calibrate_on = fit if floor_on == "training" else aside
            value, floor = head_miou(bench, fit, calibrate_on, held_out, kind, head_steps, seed)
            row = f"ZegCLIP head on {masks} ({len(fit)}) masks, {head_steps} steps, floor on {floor_on} masks"
            add(f"{row}: mIoU", value)
            add(f"{row}: floor", floor)
        for count in (passes or (HEAD_PASSES,)) if "heads" in parts else ():
            head_steps = schedule(len(train), count, SERVICE.zegclip_max_steps)
            for label in heads:
                projection, focal_everywhere = ZEGCLIP_BEFORE[label]
                with focal_over_maps() if focal_everywhere else contextlib.nullcontext():
                    value, floor = head_miou(bench, train, aside, held_out, kind, head_steps, seed, projection)
                add(f"ZegCLIP head {label}, {head_steps} steps: mIoU", value)
                add(f"ZegCLIP head {label}, {head_steps} steps: floor", floor)
        print(f"seed {seed} done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = q.study_parser(__doc__, scenes=100, seeds=2)
    parser.add_argument("--kind", default="colour", choices=tuple(q.KINDS))
    parser.add_argument("--k", type=int, default=50, help="corrected scenes")
    parser.add_argument("--steps", type=int, default=100, help="CLIPSelf steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="CLIPSelf learning rate")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which recipes to measure")
    parser.add_argument(
        "--passes",
        type=int,
        nargs="*",
        default=[],
        help="ZegCLIP: only these passes over four fifths of the masks (floor set on the fifth)",
    )
    parser.add_argument("--heads", nargs="+", choices=tuple(ZEGCLIP_BEFORE), default=tuple(ZEGCLIP_BEFORE),
                        help="the ZegCLIP heads of --parts heads")  # fmt: skip
    args = parser.parse_args(argv)
    bench = q.study_bench(args.checkpoint)
    rows = measure(bench, args.kind, args.k, args.steps, args.lr, args.scenes, args.seeds, args.parts, args.passes,
                   args.heads)  # fmt: skip
    print(f"\n{args.kind}, K = {args.k}, CLIPSelf {args.steps} steps at lr {args.lr}\n")
    print("| figure | mean ± spread |\n|---|---|")
    for row, values in rows.items():
        print(f"| {row} | {np.mean(values):.3f} ± {np.std(values):.3f} |")


if __name__ == "__main__":
    main()
