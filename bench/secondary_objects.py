"""Which tagging route finds the objects a caption would leave out, measured on the toy world.

    python -m bench.secondary_objects --checkpoint bench/models/toy-clip --scenes 200 --seeds 3 [--size 256]

TagCLIP's argument is that CLIP's global embedding, trained on captions that name an image's main
subject, under-scores the other objects, and that classifying patches (its local route) finds them.
This study splits each label's average precision by the role of the label in a scene: on its
largest object (what a web caption names), or only on the others. Positives are the scenes where
the label has that role, negatives the scenes without it; the mean is over labels with a positive.
Rows: the global embedding and TagCLIP (DMAR + CWR), scores as section 1 of ``bench/quality.py``;
mean ± spread over seeds. ``--size`` sees the 128-pixel scenes larger, so each object spans more
patches. Prints a markdown table.
"""

from __future__ import annotations

import numpy as np

from bench import quality as q
from bench.toyworld import Scene, scenes
from common.quality import mean_average_precision

ABSENT, MAIN, OTHER = 0, 1, 2
ROLES = {"largest object": MAIN, "other objects only": OTHER}
ROUTES = {"global": "global", "TagCLIP (dmar+cwr)": "dmar+cwr"}


def roles(held_out: list[Scene], kind: str) -> np.ndarray:
    """[N, C]: ABSENT, MAIN (the label is the largest object's) or OTHER (only smaller objects')."""
    names = q.KINDS[kind]
    out = np.full((len(held_out), len(names)), ABSENT)
    for i, scene in enumerate(held_out):
        if not scene.objects:
            continue
        label = [names.index(o.colour if kind == "colour" else o.shape) for o in scene.objects]
        areas = np.bincount(scene.object_map.ravel(), minlength=len(label) + 1)[1 : len(label) + 1]
        out[i, label] = OTHER
        out[i, label[int(np.argmax(areas))]] = MAIN
    return out


def role_ap(scores: np.ndarray, role: np.ndarray, which: int) -> float:
    """Mean over labels of the AP of scenes where the label has role ``which`` against scenes without it."""
    aps = []
    for c in range(scores.shape[1]):
        rows = (role[:, c] == which) | (role[:, c] == ABSENT)
        if (role[rows, c] == which).any():
            aps.append(mean_average_precision(scores[rows][:, [c]], (role[rows][:, [c]] == which)))
    return float(np.mean(aps))


def measure(bench: q.Bench, n_scenes: int, seeds: int) -> dict[tuple[str, str], list[float]]:
    """(row, kind) -> one AP per seed; rows ``"<route>, <role>"``."""
    figures: dict[tuple[str, str], list[float]] = {}
    for seed in range(seeds):
        held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
        for kind in q.KINDS:
            scores, role = q.tag_scores(bench, held_out, kind), roles(held_out, kind)
            for route, method in ROUTES.items():
                for name, which in ROLES.items():
                    figures.setdefault((f"{route}, {name}", kind), []).append(role_ap(scores[method], role, which))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = q.study_parser(__doc__)
    parser.add_argument("--size", type=int, default=q.SIZE, help="the side scenes are seen at (IMAGE_SIZE)")
    args = parser.parse_args(argv)
    bench = q.study_bench(args.checkpoint)
    bench.input_size = args.size
    figures = measure(bench, args.scenes, args.seeds)
    print(q.kind_table(figures, "route, label's role in the scene (AP)"))


if __name__ == "__main__":
    main()
