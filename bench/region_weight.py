"""The region prototypes' weight: held-out masks at every weight, beside the one the learner picks.

    python -m bench.region_weight --seeds 2

The few-shot learner draws a label's masks with ``normalize((1 - gamma) t + gamma p)``, its text
embedding ``t`` and the prototype ``p`` of its corrected regions, and picks gamma on the corrected
masks alone (``worker.training.adapt.fit_prototypes``). This draws section 3's colour projects
(``bench.quality``: the same labels, pool and held-out scenes per seed, corrected at random and
least confident first) at each weight of ``WEIGHTS`` on the held-out scenes, as the service serves
them, and prints mask IoU of the present labels and the share accepted unchanged at each, beside
the weight the learner picked: what docs/algorithms.md section 6 ("Why the prototype alone")
rests on. Shape projects are left out: their dense features hold nothing to average.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from bench import quality
from bench.toyworld import scenes
from common.settings import Settings
from worker.loading import load_clip
from worker.model.text import TextEmbedder
from worker.predictor import Predictor
from worker.training.adapt import REGION_SAMPLES, fit, fit_prototypes, region_prototypes

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # 0: text alone


def measure(predictor: Predictor, seed: int, n_held_out: int, n_pool: int, ks: tuple[int, ...],
            active_ks: tuple[int, ...]) -> list[dict]:  # fmt: skip
    """One row per colour project and K of one seed: the learner's pick and its left-out mean IoU
    per weight tried, and the held-out figures at each of ``WEIGHTS``."""
    held_out = scenes(quality.HELD_OUT_SEED + seed, n_held_out, quality.SIZE, empty_rate=quality.EMPTY_RATE)
    pool = scenes(quality.POOL_SEED + seed, n_pool, quality.SIZE, empty_rate=quality.EMPTY_RATE)
    prepared = list(predictor.prepare([s.image for s in held_out]))
    settings = predictor.settings
    rows = []
    for corrected, pool_results, random_order in quality.corrected_projects(predictor, pool, seed, ("colour",)):
        unsure_first = np.argsort([r.score for r in pool_results], kind="stable")
        for order, name, chosen_ks in ((random_order, "random", ks), (unsure_first, "least confident", active_ks)):
            for k in chosen_ks:
                chosen = order[:k]
                few_shot = fit(corrected.scores[chosen], corrected.embeddings[chosen], corrected.truth[chosen],
                               corrected.labels, settings.tag_min_score, settings.tag_scores).few_shot  # fmt: skip
                samples = [corrected.regions[i] for i in chosen[-REGION_SAMPLES:]]
                picked, left_out = fit_prototypes(samples, corrected.text, corrected.background, corrected.labels,
                                                  predictor.dense_kind)  # fmt: skip
                held = {}
                for weight in WEIGHTS:
                    prototypes = region_prototypes(samples, corrected.labels, weight, predictor.dense_kind) \
                        if weight else None  # fmt: skip
                    adapted = predictor.with_few_shot(dataclasses.replace(few_shot, prototypes=prototypes))
                    figures = quality.project_figures(adapted, held_out, prepared, corrected.kind, corrected.labels)
                    held[weight] = {m: figures[m] for m in ("mask_iou", "accepted")}
                rows.append({"seed": seed, "project": f"{corrected.kind} x{len(corrected.labels)}", "chosen": name,
                             "k": k, "picked": picked.gamma if picked else 0.0, "left_out": left_out,
                             "held_out": held})  # fmt: skip
    return rows


def table(rows: list[dict]) -> list[str]:
    """Per project, the mean over seeds and K of held-out mask IoU and accepted share at the
    learner's pick, at each weight, and at the best weight per fit (chosen on the held-out scenes:
    a bound, not a rule)."""
    pickers = {"picked": lambda r: r["picked"], **{f"gamma {w}": _fixed(w) for w in WEIGHTS},
               "best per fit": lambda r: max(WEIGHTS, key=lambda w: r["held_out"][w]["mask_iou"])}  # fmt: skip
    lines = ["| project | fits | " + " | ".join(pickers) + " |", "|---|---|" + "---|" * len(pickers)]
    projects = dict.fromkeys(r["project"] for r in rows)
    for project, group in [*((p, [r for r in rows if r["project"] == p]) for p in projects), ("all", rows)]:
        cells = []
        for pick in pickers.values():
            figures = [r["held_out"][pick(r)] for r in group]
            cells.append(f"{np.mean([f['mask_iou'] for f in figures]):.3f}, "
                         f"{np.mean([f['accepted'] for f in figures]):.1%}")  # fmt: skip
        lines.append(f"| {project} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def _fixed(weight: float):
    return lambda row: weight


def main(argv: list[str] | None = None) -> None:
    parser = quality.study_parser(__doc__, seeds=2)
    parser.add_argument("--pool", type=int, default=300, help="scenes the annotator may correct, per seed")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 50, 100], help="random corrections")
    parser.add_argument("--least-confident", type=int, nargs="*", default=[10, 50], help="corrections, least "
                        "confident first (the lowest task scores)")  # fmt: skip
    args = parser.parse_args(argv)
    # as section 3 of docs/quality.md runs
    settings = Settings(model_checkpoint=args.checkpoint, device="cpu", image_size=quality.SIZE,
                        background_words=quality.BACKGROUNDS, dense_head="maskclip", tag_scores="global",
                        dense_pamr="auto")  # fmt: skip
    bundle = load_clip(settings)
    predictor = Predictor(settings, bundle, text=TextEmbedder(bundle))
    rows = []
    for seed in range(args.seeds):
        for row in measure(predictor, seed, args.scenes, args.pool, tuple(args.k), tuple(args.least_confident)):
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
