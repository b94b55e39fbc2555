"""Two of the papers' recipes, measured on the toy world before the service takes them.

    python -m bench.recipes --scenes 200 --seeds 3

* Positional embeddings resized bicubically (ClearCLIP's and NACLIP's repositories) or bilinearly
  (TagCLIP's, and the service's): TagCLIP's tag mAP and the segmentation mIoU of every head.
* PAMR (NACLIP's post-processing): scores refined along the image's edges before each pixel
  gets its class.
* A probability floor for training-free masks (the papers' ``prob_thd`` for VOC with background:
  ClearCLIP 0.5, NACLIP 0.1): pixels whose best class probability is under it stay unlabelled.

Segmentation as section 2 of ``bench/quality.py`` (background included, restricted to the tags
TagCLIP finds); mean ± spread over seeds. Prints a markdown table.
"""

from __future__ import annotations

from bench import quality as q
from bench.toyworld import scenes
from common.quality import mean_average_precision, miou
from worker.model import vit

HEADS = (("maskclip", False), ("clearclip", True), ("naclip", True))
FLOORS = (0.0, 0.1, 0.3, 0.5)


def measure(bench: q.Bench, n_scenes: int, seeds: int) -> dict[tuple[str, str], list[float]]:
    """(row, kind) -> one figure per seed, for both interpolations and every floor."""
    figures: dict[tuple[str, str], list[float]] = {}
    for mode in ("bilinear", "bicubic"):
        vit.POSITION_INTERPOLATION = mode
        for seed in range(seeds):
            held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
            for kind, names in q.KINDS.items():
                scores = q.tag_scores(bench, held_out, kind)["dmar+cwr"]
                figures.setdefault((f"TagCLIP mAP, {mode}", kind), []).append(
                    mean_average_precision(scores, q.truth_tags(held_out, kind))
                )
                tags, truth = q.selected(scores, names), [s.class_map(kind) for s in held_out]
                for head, sliding in HEADS:
                    for floor in FLOORS if mode == "bilinear" else (0.0,):
                        row = f"{head}{' sliding' if sliding else ''} + tags, {mode}, floor {floor}"
                        maps = q.dense_maps(bench, held_out, kind, head, tags, sliding, floor)
                        figures.setdefault((row, kind), []).append(miou(maps, truth, len(names)))
                    if mode == "bilinear":
                        maps = q.dense_maps(bench, held_out, kind, head, tags, sliding, refine=True)
                        row = f"{head}{' sliding' if sliding else ''} + tags, {mode}, PAMR"
                        figures.setdefault((row, kind), []).append(miou(maps, truth, len(names)))
    vit.POSITION_INTERPOLATION = "bilinear"
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = q.study_parser(__doc__)
    args = parser.parse_args(argv)
    print(q.kind_table(measure(q.study_bench(args.checkpoint), args.scenes, args.seeds), "figure"))


if __name__ == "__main__":
    main()
