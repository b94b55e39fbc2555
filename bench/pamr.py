"""PAMR on the masks the few-shot learner draws: colour projects of the quality benchmark's
section 3, before and after K corrections, with DENSE_PAMR false and true, for one dense head.

    python -m bench.pamr --dense-head clearclip --seeds 1

Section 3 of ``bench.quality`` runs with MaskCLIP's head (``--dense-pamr``); this runs the same
projects (the same labels, held-out and pool scenes per seed) with any head, colour projects only,
and prints mask IoU of the present labels and the share accepted unchanged (the service's
definition). It is what DENSE_PAMR=auto rests on: PAMR lifts the masks a project's region
prototypes draw, and not training-free ones (docs/algorithms.md section 3).
"""

from __future__ import annotations

import argparse
import json

from bench import quality
from bench.toyworld import scenes
from common.settings import DENSE_HEADS, Settings
from worker.loading import load_clip
from worker.model.text import TextEmbedder
from worker.predictor import Predictor


def measure(checkpoint: str, dense_head: str, seed: int, n_held_out: int, n_pool: int, ks: tuple[int, ...]) -> dict:
    """{DENSE_PAMR: {project: {stage: {"mask_iou", "accepted", "exact"}}}} for one seed."""
    held_out = scenes(quality.HELD_OUT_SEED + seed, n_held_out, quality.SIZE, empty_rate=quality.EMPTY_RATE)
    pool = scenes(quality.POOL_SEED + seed, n_pool, quality.SIZE, empty_rate=quality.EMPTY_RATE)
    out = {}
    for pamr in ("false", "true"):
        settings = Settings(model_checkpoint=checkpoint, device="cpu", image_size=quality.SIZE,
                            background_words=quality.BACKGROUNDS, dense_head=dense_head, tag_scores="global",
                            dense_pamr=pamr)  # fmt: skip
        bundle = load_clip(settings)
        predictor = Predictor(settings, bundle, text=TextEmbedder(bundle))
        # colour projects only: shape masks hold nothing to refine on this model
        small = quality.small_label_sets(predictor, held_out, pool, seed, ks=ks, active_ks=(), kinds=("colour",))
        out[pamr] = {
            project: {stage: {m: row[stage][m] for m in ("mask_iou", "accepted", "exact")}
                      for stage in ("before", *(f"after {k}" for k in ks))}
            for project, row in small.items() if isinstance(row, dict)
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bench/models/toy-clip")
    parser.add_argument("--dense-head", default="clearclip", choices=DENSE_HEADS)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes per seed")
    parser.add_argument("--pool", type=int, default=300, help="scenes the annotator may correct, per seed")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="corrections")
    args = parser.parse_args(argv)
    for seed in range(args.seeds):
        figures = measure(args.checkpoint, args.dense_head, seed, args.scenes, args.pool, tuple(args.k))
        print(json.dumps({"seed": seed, "dense_head": args.dense_head, "figures": figures}))
        for pamr, projects in figures.items():
            for project, stages in projects.items():
                print(f"seed {seed} DENSE_PAMR={pamr} {project}: " + "  ".join(
                    f"{stage}: IoU {f['mask_iou']:.3f}, accepted {f['accepted']:.1%}, exact {f['exact']:.1%}"
                    for stage, f in stages.items()))  # fmt: skip


if __name__ == "__main__":
    main()
