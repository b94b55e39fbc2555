"""Training-free masks at several working sizes (``IMAGE_SIZE``), measured on the toy world.

    python -m bench.working_size --sizes 128 192 256 --scenes 200 --seeds 3

The dense heads see an image at its working size: whole on TagCLIP's trunk, or in windows of the
model's native input at half-window stride (``DENSE_SLIDING``, the papers'). The larger the working
size, the closer up each window looks, so the question is the scale at which a model's patches
know their object. Rows: MaskCLIP on the whole image (section 2 of ``bench/quality.py``) and every
head with sliding windows, MaskCLIP's being what section 3 serves on the toy CLIP. Segmentation as
section 2 (background included, restricted to the tags TagCLIP finds at the same size); mean ±
spread over seeds, and the seconds each configuration took. Prints a markdown table.
"""

from __future__ import annotations

import time

from bench import quality as q
from bench.toyworld import scenes
from common.quality import miou

HEADS = (("maskclip", False), ("maskclip", True), ("clearclip", True), ("naclip", True))


def measure(bench: q.Bench, sizes: list[int], n_scenes: int, seeds: int) -> dict[tuple[str, str], list[float]]:
    """(row, kind) -> one figure per seed; rows ``"<size>: <head>"`` and ``"<size>: seconds"``."""
    figures: dict[tuple[str, str], list[float]] = {}
    for size in sizes:
        bench.input_size = size
        for seed in range(seeds):
            held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
            for kind, names in q.KINDS.items():
                start = time.perf_counter()
                tags = q.selected(q.tag_scores(bench, held_out, kind)["dmar+cwr"], names)
                truth = [s.class_map(kind) for s in held_out]
                for head, sliding in HEADS:
                    maps = q.dense_maps(bench, held_out, kind, head, tags, sliding)
                    row = f"{size}: {head}{' sliding' if sliding else ''} + tags"
                    figures.setdefault((row, kind), []).append(miou(maps, truth, len(names)))
                figures.setdefault((f"{size}: seconds", kind), []).append(time.perf_counter() - start)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = q.study_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[q.SIZE], help="working sizes (IMAGE_SIZE)")
    args = parser.parse_args(argv)
    figures = measure(q.study_bench(args.checkpoint), args.sizes, args.scenes, args.seeds)
    print(q.kind_table(figures, "working size: head (mIoU)"))


if __name__ == "__main__":
    main()
