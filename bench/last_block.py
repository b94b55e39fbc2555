"""Which part of CLIP's last block carries a model's local information, measured on the toy world.

    python -m bench.last_block --scenes 200 --seeds 3

The dense heads differ only in their last block: MaskCLIP keeps the residual stream, the value
path (each token attending to itself) and the FFN; ClearCLIP keeps query-query attention alone.
ClearCLIP's argument is that on web-scale CLIP the residual stream hides local semantics; this
benchmark takes the block apart piece by piece on a given model to see what each piece carries.
Segmentation as section 2 of ``bench/quality.py`` (sliding windows, background included,
restricted to the tags TagCLIP finds); mean ± spread over seeds. Prints a markdown table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor

from bench import quality as q
from bench.toyworld import scenes
from common.quality import miou
from worker.model import dense, vit

Block = ResidualAttentionBlock


def _attend(block: Block, q_: Tensor, v: Tensor) -> Tensor:
    return vit.merge_heads(block, F.scaled_dot_product_attention(q_, q_, v))


def _ffn(block: Block, x: Tensor) -> Tensor:
    return block.ls_2(block.mlp(block.ln_2(x)))


#: Last-block variants: (block, its input x, q, v) -> the tokens projected into the text space.
VARIANTS: dict[str, Callable[[Block, Tensor, Tensor, Tensor], Tensor]] = {
    "MaskCLIP: x + self-value + FFN": lambda b, x, q_, v: vit.finish_block(b, x, v),
    "x + self-value (no FFN)": lambda b, x, q_, v: x + b.ls_1(vit.merge_heads(b, v)),
    "self-value alone": lambda b, x, q_, v: vit.merge_heads(b, v),
    "x alone (the residual stream)": lambda b, x, q_, v: x,
    "x + FFN(x)": lambda b, x, q_, v: x + _ffn(b, x),
    "ClearCLIP: q-q attention alone": lambda b, x, q_, v: _attend(b, q_, v),
    "x + q-q attention": lambda b, x, q_, v: x + b.ls_1(_attend(b, q_, v)),
    "x + q-q attention + FFN": lambda b, x, q_, v: (y := x + b.ls_1(_attend(b, q_, v))) + _ffn(b, y),
}


@contextmanager
def last_block(variant: Callable[[Block, Tensor, Tensor, Tensor], Tensor]) -> Iterator[None]:
    """Dense features computed with ``variant`` as the last block while inside; the heads' own after."""
    original = dense.dense_block

    def block(b: Block, x: Tensor, head: str, grid: tuple[int, int], sigma: float = 5.0) -> Tensor:
        q_, _, v = vit.qkv(b, x)
        return variant(b, x, q_, v)

    dense.dense_block = block
    try:
        yield
    finally:
        dense.dense_block = original


def measure(bench: q.Bench, n_scenes: int, seeds: int) -> dict[tuple[str, str], list[float]]:
    """(variant, kind) -> one mIoU per seed."""
    figures: dict[tuple[str, str], list[float]] = {}
    for seed in range(seeds):
        held_out = scenes(q.HELD_OUT_SEED + seed, n_scenes, q.SIZE, empty_rate=q.EMPTY_RATE)
        for kind, names in q.KINDS.items():
            tags = q.selected(q.tag_scores(bench, held_out, kind)["dmar+cwr"], names)
            truth = [s.class_map(kind) for s in held_out]
            for name, variant in VARIANTS.items():
                with last_block(variant):
                    maps = q.dense_maps(bench, held_out, kind, "maskclip", tags, sliding=True)
                figures.setdefault((name, kind), []).append(miou(maps, truth, len(names)))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = q.study_parser(__doc__)
    args = parser.parse_args(argv)
    figures = measure(q.study_bench(args.checkpoint), args.scenes, args.seeds)
    print(q.kind_table(figures, "last block, sliding windows + tags (mIoU)"))


if __name__ == "__main__":
    main()
