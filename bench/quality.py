"""Quality benchmark on the toy world: tags, masks and the learning loop, side by side.

    python -m bench.quality --checkpoint bench/models/toy-clip --out docs/quality.md

Everything runs on held-out scenes from fixed seeds with the service's own model code:

1. tagging mAP and F1 (TagCLIP's relative threshold) over colour and over shape classes, for the
   global embedding (plain CLIP), patch-level classification, TagCLIP with DMAR, and with DMAR + CWR;
2. segmentation mIoU for the MaskCLIP value path and the dense heads (ClearCLIP, NACLIP), over all
   classes and restricted to the tags TagCLIP found;
3. the learning loop: K scenes corrected (the correction is the ground truth), a ZegCLIP head
   trained on them, shape masks and the share of pre-labels accepted unchanged before and after;
4. active learning: the K scenes to correct chosen by the service's confidence score (least sure
   first) or at random, and the gain per correction of each.

Prints the tables, writes them as JSON (``--json``) and as a markdown report (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.publish import publish
from bench.toyworld import BACKGROUNDS, COLOURS, SHAPES, Scene, scenes
from common.labelstudio.brush import draw_scaled
from common.quality import mean_average_precision, micro_f1, miou
from worker.checkpoints import version_visual
from worker.model import dense, vit
from worker.model.bundle import ClipBundle
from worker.model.preprocess import to_pixels
from worker.model.selection import select_tags
from worker.model.tagclip import TagCLIPConfig, reidentify, run_trunk, tagclip_head
from worker.model.text import TextEmbedder
from worker.model.zegclip import ZegCLIP, ZegCLIPConfig
from worker.training.clipself import CLIPSelfConfig, train_clipself
from worker.training.corrections import Correction
from worker.training.zegclip import TrainingSample, calibrate_threshold, train_zegclip

HELD_OUT_SEED, POOL_SEED = 1000, 2000
SIZE = 64
KINDS = {"colour": tuple(COLOURS), "shape": SHAPES}
TAG_METHODS = ("global", "patch", "dmar", "dmar+cwr")
HEADS = ("maskclip", "clearclip", "naclip")
ACCEPT_IOU = 0.75  # a mask counts as accepted unchanged at this IoU with the truth
MIN_AREA = 0.002  # the service's default MASK_MIN_AREA


@dataclass
class Bench:
    bundle: ClipBundle
    text: TextEmbedder
    cfg: TagCLIPConfig
    batch_size: int

    def class_text(self, classes: Sequence[str]) -> torch.Tensor:
        """The classes first, then the toy world's backgrounds as background words."""
        return self.text.classes([(c,) for c in classes] + [(b,) for b in BACKGROUNDS])

    def pixels(self, batch: Sequence[Scene]) -> torch.Tensor:
        return torch.stack([to_pixels(s.image, (SIZE, SIZE), self.bundle.mean, self.bundle.std) for s in batch])


def truth_tags(held_out: Sequence[Scene], kind: str) -> np.ndarray:
    names = KINDS[kind]
    present = [s.colours if kind == "colour" else s.shapes for s in held_out]
    return np.array([[name in p for name in names] for p in present])


@torch.no_grad()
def tag_scores(bench: Bench, held_out: Sequence[Scene], kind: str) -> dict[str, np.ndarray]:
    """[N, C] scores per method; all but ``global`` share one trunk pass."""
    classes = KINDS[kind]
    C, text = len(classes), bench.class_text(classes)
    visual, scale = bench.bundle.visual, bench.bundle.logit_scale
    out: dict[str, list] = {m: [] for m in TAG_METHODS}
    local = []
    for start in range(0, len(held_out), bench.batch_size):
        pixels = bench.pixels(held_out[start : start + bench.batch_size])
        image = F.normalize(vit.encode_tokens(visual, pixels)[:, 0], dim=-1)
        out["global"].append((scale * image @ text.T).softmax(dim=-1)[:, :C])
        chunk = tagclip_head(bench.bundle, run_trunk(bench.bundle, pixels, bench.cfg), text, C, bench.cfg)
        out["patch"] += [item.patch_probs[:, :C].amax(dim=0)[None] for item in chunk]
        out["dmar"] += [item.scores[None] for item in chunk]
        local += chunk
    out["dmar+cwr"] = [s[None] for s in reidentify(bench.bundle, local, text, bench.cfg, bench.batch_size)]
    return {m: torch.cat(v).float().numpy() for m, v in out.items()}


def selected(scores: np.ndarray, names: Sequence[str], threshold: float) -> np.ndarray:
    """TagCLIP's relative-threshold decision per image, as the service makes it."""
    rows = []
    for row in scores:
        chosen, _ = select_tags(dict(zip(names, row.tolist(), strict=True)), True, threshold)
        rows.append([name in chosen for name in names])
    return np.array(rows)


def class_map(masks: Sequence[dense.Mask], class_ids: Sequence[int]) -> np.ndarray:
    """Masks of classes ``class_ids[m.index]`` as one map (0 where nothing was labelled)."""
    out = np.zeros((SIZE, SIZE), dtype=np.int64)
    for m in masks:
        out[draw_scaled(m.region, m.size)] = class_ids[m.index] + 1
    return out


@torch.no_grad()
def dense_maps(bench: Bench, held_out: Sequence[Scene], kind: str, head: str, tags: np.ndarray | None) -> list:
    """Predicted class maps from a training-free head; ``tags`` [N, C] restricts the classes."""
    classes = KINDS[kind]
    C, text = len(classes), bench.class_text(classes)
    maps = []
    for start in range(0, len(held_out), bench.batch_size):
        pixels = bench.pixels(held_out[start : start + bench.batch_size])
        trunk = run_trunk(bench.bundle, pixels, bench.cfg)
        features = dense.dense_features(bench.bundle.visual, trunk.tokens, trunk.grid, head)
        for b in range(pixels.shape[0]):
            ids = list(np.flatnonzero(tags[start + b])) if tags is not None else list(range(C))
            rows = ids + list(range(C, text.shape[0]))
            logits = dense.class_logits(features[b], text[rows], trunk.grid)
            maps.append(class_map(dense.masks_from_logits(logits, len(ids), (SIZE, SIZE), MIN_AREA), ids))
    return maps


@torch.no_grad()
def zegclip_maps(bench: Bench, model: ZegCLIP, held_out: Sequence[Scene], tags: np.ndarray) -> list:
    text = bench.text.classes([(s,) for s in SHAPES])
    maps = []
    for start in range(0, len(held_out), bench.batch_size):
        logits = model(bench.bundle.visual, bench.pixels(held_out[start : start + bench.batch_size]), text)
        for b in range(logits.shape[0]):
            ids = list(np.flatnonzero(tags[start + b]))
            floor = model.cfg.mask_threshold
            masks = dense.masks_from_logits(logits[b, ids], len(ids), (SIZE, SIZE), MIN_AREA, "sigmoid", floor)
            maps.append(class_map(masks, ids))
    return maps


def accepted_share(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Share of scenes whose masks an annotator would accept unchanged: the same classes, each
    mask within ACCEPT_IOU of the truth."""
    accepted = 0
    for p, t in zip(predicted, truth, strict=True):
        classes = set(np.unique(p)) | set(np.unique(t))
        classes.discard(0)
        ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in classes]
        accepted += all(iou >= ACCEPT_IOU for iou in ious)
    return accepted / len(truth)


def confidence(bench: Bench, pool: Sequence[Scene]) -> np.ndarray:
    """The service's task score for shape tags (mean distance from the tag threshold): low = unsure."""
    scores = tag_scores(bench, pool, "shape")["dmar+cwr"]
    return np.array([select_tags(dict(zip(SHAPES, row.tolist(), strict=True)), True, bench.cfg.tag_threshold)[1]
                     for row in scores])  # fmt: skip


def learning_loop(bench: Bench, pool, held_out, ks: Sequence[int], steps: int, seed: int, lr: float) -> dict:
    """Parts 3 and 4, as a project's training run does it: CLIPSelf fine-tuning (with the
    supervised terms) on K corrected scenes, then a ZegCLIP head on the fine-tuned ViT; the K
    scenes chosen at random or least confident first."""
    truth = [s.class_map("shape") for s in held_out]
    shape_truth = truth_tags(held_out, "shape")
    scores = tag_scores(bench, held_out, "shape")["dmar+cwr"]
    tags = selected(scores, SHAPES, bench.cfg.tag_threshold)
    before_maps = dense_maps(bench, held_out, "shape", "clearclip", tags)
    before = {"tag_map": mean_average_precision(scores, shape_truth), "miou": miou(before_maps, truth, len(SHAPES)),
              "accepted": accepted_share(before_maps, truth)}  # fmt: skip
    unsure_first = list(np.argsort(confidence(bench, pool), kind="stable"))
    shuffled = list(range(len(pool)))
    random.Random(seed).shuffle(shuffled)
    head_cfg = ZegCLIPConfig(decoder_heads=8 if bench.bundle.visual.output_dim % 8 == 0 else 4)
    text = bench.class_text(SHAPES)
    index = {name: i for i, name in enumerate(SHAPES)}
    rows = []
    for strategy, order in (("random", shuffled), ("least confident", unsure_first)):
        for k in ks:
            chosen = [pool[i] for i in order[:k]]
            corrections = [Correction(i, None, {"shape": s.shapes}, s.class_map("shape"), SHAPES, s.image)
                           for i, s in enumerate(chosen)]  # fmt: skip
            started = time.perf_counter()
            weights, _ = train_clipself(
                bench.bundle.visual, bench.bundle.visual, corrections, text, index, bench.bundle.mean,
                bench.bundle.std, CLIPSelfConfig(steps=steps, batch_size=8, lr=lr, size=SIZE), seed=seed,
            )  # fmt: skip
            tuned_bundle = dataclasses.replace(bench.bundle, visual=version_visual(bench.bundle.visual, weights))
            tuned = Bench(tuned_bundle, bench.text, bench.cfg, bench.batch_size)
            tuned_scores = tag_scores(tuned, held_out, "shape")["dmar+cwr"]
            tuned_tags = selected(tuned_scores, SHAPES, bench.cfg.tag_threshold)
            clipself_maps = dense_maps(tuned, held_out, "shape", "clearclip", tuned_tags)
            samples = [TrainingSample(s.image, s.class_map("shape"), SHAPES) for s in chosen]
            head, _ = train_zegclip(tuned_bundle, samples, SHAPES, head_cfg, steps=steps, batch_size=8, lr=1e-3,
                                    size=SIZE, seed=seed)  # fmt: skip
            calibrate_threshold(tuned_bundle, head, samples, SHAPES, SIZE)
            head_maps = zegclip_maps(tuned, head, held_out, tuned_tags)
            final = miou(head_maps, truth, len(SHAPES))
            rows.append({
                "strategy": strategy, "k": k,
                "tag_map_before": before["tag_map"], "tag_map_after": mean_average_precision(tuned_scores, shape_truth),
                "miou_before": before["miou"], "miou_clipself": miou(clipself_maps, truth, len(SHAPES)),
                "miou_after": final, "accepted_before": before["accepted"],
                "accepted_after": accepted_share(head_maps, truth),
                "gain_per_correction": (final - before["miou"]) / k,
                "train_seconds": round(time.perf_counter() - started, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return {"before": before, "rows": rows, "clipself_lr": lr, "steps": steps}


def run(
    bench: Bench, n_held_out: int, n_pool: int, ks: Sequence[int], steps: int, seed: int = 0, lr: float = 1e-4
) -> dict:
    held_out = [s for s in scenes(HELD_OUT_SEED, n_held_out, SIZE) if s.objects]
    pool = [s for s in scenes(POOL_SEED, n_pool, SIZE) if s.objects]
    report: dict = {"tagging": {}, "segmentation": {}, "scenes": len(held_out)}
    restricted: dict[str, np.ndarray] = {}
    for kind, names in KINDS.items():
        truth = truth_tags(held_out, kind)
        scores = tag_scores(bench, held_out, kind)
        report["tagging"][kind] = {
            m: {"mAP": mean_average_precision(s, truth),
                "F1": micro_f1(selected(s, names, bench.cfg.tag_threshold), truth)}
            for m, s in scores.items()
        }  # fmt: skip
        restricted[kind] = selected(scores["dmar+cwr"], names, bench.cfg.tag_threshold)
    for head in HEADS:
        for restrict in (False, True):
            key = f"{head}{' + tags' if restrict else ''}"
            report["segmentation"][key] = {
                kind: miou(dense_maps(bench, held_out, kind, head, restricted[kind] if restrict else None),
                           [s.class_map(kind) for s in held_out], len(names))
                for kind, names in KINDS.items()
            }  # fmt: skip
    report["learning"] = learning_loop(bench, pool, held_out, ks, steps, seed, lr)
    return report


def markdown(report: dict, command: str, description: str) -> str:
    lines = [
        "# Quality on the toy world",
        "",
        f"Produced by `{command}` on {dt.date.today().isoformat()} ({platform.processor() or platform.machine()},",
        f"CPU, torch {torch.__version__}), model: {description}. {report['scenes']} held-out scenes",
        "(seed 1000), 64 x 64 pixels. See `bench/quality.py` for the definitions.",
        "",
        "## 1. Tagging",
        "",
        "| method | colour mAP | colour F1 | shape mAP | shape F1 |",
        "|---|---|---|---|---|",
    ]
    tags = report["tagging"]
    for m in TAG_METHODS:
        c, s = tags["colour"][m], tags["shape"][m]
        lines.append(f"| {m} | {c['mAP']:.3f} | {c['F1']:.3f} | {s['mAP']:.3f} | {s['F1']:.3f} |")
    lines += ["", "## 2. Segmentation (mIoU, background included)", "",
              "| head | colour mIoU | shape mIoU |", "|---|---|---|"]  # fmt: skip
    for key, row in report["segmentation"].items():
        lines.append(f"| {key} | {row['colour']:.3f} | {row['shape']:.3f} |")
    learning = report["learning"]
    lines += [
        "",
        "## 3-4. Learning loop and active learning (shape tags and masks)",
        "",
        f"As a project's training run: CLIPSelf + supervised terms ({learning['steps']} steps, lr "
        f"{learning['clipself_lr']}), then a ZegCLIP head on the fine-tuned ViT ({learning['steps']} steps).",
        f"Before any correction: shape tag mAP {learning['before']['tag_map']:.3f}, mask mIoU (ClearCLIP + tags) "
        f"{learning['before']['miou']:.3f}, accepted unchanged {learning['before']['accepted']:.1%}.",
        "",
        "| chosen | K | tag mAP after | mIoU after CLIPSelf | mIoU after + ZegCLIP | accepted after | "
        "mIoU gain per correction | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in learning["rows"]:
        lines.append(f"| {r['strategy']} | {r['k']} | {r['tag_map_after']:.3f} | {r['miou_clipself']:.3f} | "
                     f"{r['miou_after']:.3f} | {r['accepted_after']:.1%} | {r['gain_per_correction']:+.4f} | "
                     f"{r['train_seconds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from common.settings import Settings
    from worker.loading import load_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="bench/models/toy-clip")
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes")
    parser.add_argument("--pool", type=int, default=300, help="scenes the annotator may correct")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50, 100], help="corrections per run")
    parser.add_argument("--steps", type=int, default=500, help="CLIPSelf and ZegCLIP steps per training run")
    parser.add_argument("--lr", type=float, default=1e-4, help="CLIPSelf learning rate (the service's TRAIN_LR)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    bundle = load_clip(Settings(model_checkpoint=args.checkpoint, device="cpu"))
    bench = Bench(bundle, TextEmbedder(bundle), TagCLIPConfig(), batch_size=32)
    report = run(bench, args.scenes, args.pool, args.k, args.steps, lr=args.lr)
    command = "python -m bench.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(markdown(report, command, bundle.description), report, args.json, args.out)


if __name__ == "__main__":
    main()
