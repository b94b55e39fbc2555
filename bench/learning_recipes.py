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

Mean ± spread over seeds; each seed draws its own held-out and corrected scenes. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import numpy as np

from bench import quality as q
from bench.toyworld import Scene, scenes
from common.quality import mean_average_precision, miou
from common.settings import Settings
from worker.checkpoints import version_visual
from worker.loading import load_clip
from worker.model.tagclip import TagCLIPConfig
from worker.model.text import TextEmbedder
from worker.model.zegclip import ZegCLIPConfig
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
PARTS = ("clipself", "zegclip")
OLD_STEPS = 300  # TRAIN_STEPS, which ZegCLIP heads used to train for whatever the data
SERVICE = Settings()  # the service's defaults: ZEGCLIP_EPOCHS, ZEGCLIP_MAX_STEPS, TRAIN_HOLDOUT


def figures(bench: q.Bench, held_out: list[Scene], kind: str) -> dict[str, float]:
    names = q.KINDS[kind]
    truth, scores = q.truth_tags(held_out, kind), q.tag_scores(bench, held_out, kind)
    maps = q.dense_maps(bench, held_out, kind, "clearclip", truth, sliding=True)
    return {
        "ClearCLIP mIoU": miou(maps, [s.class_map(kind) for s in held_out], len(names)),
        "TagCLIP mAP": mean_average_precision(scores["dmar+cwr"], truth),
        "global mAP": mean_average_precision(scores["global"], truth),
    }


def head_miou(bench: q.Bench, samples: list, aside: list, held_out: list[Scene], kind: str, steps: int, seed: int):
    names = list(q.KINDS[kind])
    cfg = ZegCLIPConfig(decoder_heads=8 if bench.bundle.visual.output_dim % 8 == 0 else 4)
    head, _ = train_zegclip(bench.bundle, samples, names, cfg, steps=steps, lr=1e-3, size=bench.input_size, seed=seed)
    calibrate_threshold(bench.bundle, head, aside, names, bench.input_size)
    maps = q.zegclip_maps(bench, head, held_out, q.truth_tags(held_out, kind), kind)
    return miou(maps, [s.class_map(kind) for s in held_out], len(names)), head.cfg.mask_threshold


def measure(
    bench: q.Bench, kind: str, k: int, steps: int, lr: float, n_scenes: int, seeds: int, parts: Sequence[str] = PARTS,
    passes: Sequence[int] = (),
) -> dict:  # fmt: skip
    names = q.KINDS[kind]
    rows: dict[str, list[float]] = {}

    def add(row: str, value: float) -> None:
        rows.setdefault(row, []).append(value)

    for seed in range(seeds):
        held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
        chosen = [s for s in scenes(q.POOL_SEED + seed, 2 * k, q.SIZE, empty_rate=q.EMPTY_RATE) if s.objects][:k]
        present = [s.colours if kind == "colour" else s.shapes for s in chosen]
        corrections = [Correction(i, None, {"tags": set(p)}, s.class_map(kind).astype(np.uint8), names, s.image)
                       for i, (s, p) in enumerate(zip(chosen, present, strict=True))]  # fmt: skip
        for name, value in figures(bench, held_out, kind).items():
            add(f"base model: {name}", value)
        text, index = bench.class_text(names), {n: i for i, n in enumerate(names)}
        for label, options in CLIPSELF.items() if "clipself" in parts else ():
            cfg = CLIPSelfConfig(steps=steps, batch_size=8, lr=lr, size=bench.input_size, **options)
            weights, _ = train_clipself(bench.bundle.visual, bench.bundle.visual, corrections, text, index,
                                        bench.bundle.mean, bench.bundle.std, cfg, seed=seed)  # fmt: skip
            tuned = dataclasses.replace(bench.bundle, visual=version_visual(bench.bundle.visual, weights))
            for name, value in figures(dataclasses.replace(bench, bundle=tuned), held_out, kind).items():
                add(f"{label}: {name}", value)
        samples = [TrainingSample(s.image, s.class_map(kind).astype(np.uint8), names) for s in chosen]
        train, aside = calibration_split(samples, SERVICE.train_holdout)
        heads = (ZEGCLIP if not passes else ()) + tuple(("four fifths", n, "aside") for n in passes)
        for masks, count, floor_on in heads if "zegclip" in parts else ():
            fit = samples if masks == "all" else train
            steps = OLD_STEPS if count is None else schedule(len(fit), count, SERVICE.zegclip_max_steps)
            value, floor = head_miou(bench, fit, fit if floor_on == "training" else aside, held_out, kind, steps, seed)
            row = f"ZegCLIP head on {masks} ({len(fit)}) masks, {steps} steps, floor on {floor_on} masks"
            add(f"{row}: mIoU", value)
            add(f"{row}: floor", floor)
        print(f"seed {seed} done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bench/models/toy-clip")
    parser.add_argument("--kind", default="colour", choices=tuple(q.KINDS))
    parser.add_argument("--k", type=int, default=50, help="corrected scenes")
    parser.add_argument("--steps", type=int, default=100, help="CLIPSelf steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="CLIPSelf learning rate")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes per seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which recipes to measure")
    parser.add_argument(
        "--passes",
        type=int,
        nargs="*",
        default=[],
        help="ZegCLIP: only these passes over four fifths of the masks (floor set on the fifth)",
    )
    args = parser.parse_args(argv)
    settings = Settings(model_checkpoint=args.checkpoint, device="cpu", image_size=q.SIZE,
                        background_words=q.BACKGROUNDS)  # fmt: skip
    bundle = load_clip(settings)
    bench = q.Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=32, input_size=q.SIZE)
    rows = measure(bench, args.kind, args.k, args.steps, args.lr, args.scenes, args.seeds, args.parts, args.passes)
    print(f"\n{args.kind}, K = {args.k}, CLIPSelf {args.steps} steps at lr {args.lr}\n")
    print("| figure | mean ± spread |\n|---|---|")
    for row, values in rows.items():
        print(f"| {row} | {np.mean(values):.3f} ± {np.std(values):.3f} |")


if __name__ == "__main__":
    main()
