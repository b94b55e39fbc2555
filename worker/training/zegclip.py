"""Train a project's ZegCLIP head on corrected masks, and measure it.

``train_zegclip`` is the entry point the training job calls with a project's corrections;
``python -m worker.training.zegclip DATA_DIR OUT_DIR`` trains from a folder laid out like
``shared/data/voc-samples`` (``index.json`` + images + class-id masks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.quality import iou_table
from worker.checkpoints import save_head
from worker.model import vit
from worker.model.bundle import ClipBundle
from worker.model.preprocess import to_pixels, working_size
from worker.model.text import TextEmbedder
from worker.model.zegclip import (
    IGNORE,
    NO_CLASS,
    ZegCLIP,
    ZegCLIPConfig,
    segmentation_loss,
)
from worker.training.loop import Progress, ShouldStop, TrainingReport, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSample:
    """One corrected image. ``mask`` (uint8, the image's size) holds 0 where no label applies,
    k for ``labels[k - 1]`` and 255 where nothing is known: Pascal VOC's layout."""

    image: Image.Image
    mask: np.ndarray
    labels: tuple[str, ...]


def has_label(mask: np.ndarray) -> bool:
    """Whether a mask in ``TrainingSample``'s layout paints any pixel with a label: the masks a
    head can learn a class from (all-"no label" or all-unknown masks teach it none)."""
    return bool(((mask > 0) & (mask < 255)).any())


def target_map(sample: TrainingSample, classes: Sequence[str]) -> np.ndarray:
    """The sample's mask as indices into ``classes`` (NO_CLASS, IGNORE elsewhere); labels that
    are not among ``classes`` become IGNORE, since nothing is known about them."""
    index = {name: i for i, name in enumerate(classes)}
    lookup = np.full(256, IGNORE, dtype=np.int64)
    lookup[0] = NO_CLASS
    for k, label in enumerate(sample.labels, start=1):
        lookup[k] = index.get(label, IGNORE)
    return lookup[sample.mask]


def _crop(sample: TrainingSample, classes: Sequence[str], size: int, rng: random.Random, bundle: ClipBundle):
    """A random square crop of side ``size`` after resizing the short side to ``size``; random flip."""
    image, target = sample.image, target_map(sample, classes)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    target = np.asarray(Image.fromarray(target.astype(np.int32)).resize((width, height), Image.Resampling.NEAREST))
    x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
    image = image.crop((x0, y0, x0 + size, y0 + size))
    target = target[y0 : y0 + size, x0 : x0 + size]
    if rng.random() < 0.5:
        image, target = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target[:, ::-1]
    return to_pixels(image, (size, size), bundle.mean, bundle.std), torch.from_numpy(target.astype(np.int64).copy())


#: Images per ZegCLIP training step.
BATCH_SIZE = 8


def schedule(samples: int, epochs: float, max_steps: int, batch_size: int = BATCH_SIZE) -> int:
    """Steps for ``epochs`` passes over ``samples`` corrected masks, at most ``max_steps``: a
    project's head trains in proportion to the masks it has, not for a fixed count. ZegCLIP trains
    Pascal VOC for 20k steps of 16 images over 10,582 (about 30 passes); a project's few dozen
    masks want far more passes (docs/algorithms.md section 4)."""
    return max(1, min(max_steps, math.ceil(epochs * samples / batch_size)))


def calibration_split(
    samples: Sequence[TrainingSample], fraction: float
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """About ``fraction`` of ``samples`` (every n-th, at least one once there are two) kept aside to
    set the head's "no label" floor on masks it never trained on, and the rest to train on."""
    if len(samples) < 2:
        return list(samples), []
    every = max(2, round(1 / fraction))
    aside = [s for i, s in enumerate(samples) if i % every == every - 1] or [samples[-1]]
    kept = {id(s) for s in aside}
    return [s for s in samples if id(s) not in kept], aside


def train_zegclip(
    bundle: ClipBundle,
    samples: Sequence[TrainingSample],
    classes: Sequence[str],
    cfg: ZegCLIPConfig | None = None,
    steps: int = 2000,
    batch_size: int = BATCH_SIZE,
    lr: float = 2e-4,
    size: int = 448,
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    texts: Sequence[Sequence[str]] | None = None,
) -> tuple[ZegCLIP, TrainingReport]:
    """Train prompts and head (the CLIP backbone stays frozen) on ``samples`` for ``classes``.

    AdamW (weight decay 0.01), linear warm-up over the first tenth, then polynomial decay (0.9),
    as ZegCLIP trains its new parameters. ``progress(step, loss)`` is called every step. ``texts``:
    the words each class is embedded from, as the service will ask the head (a label's value, alias
    and hints; default: its name).
    """
    if not samples:
        raise ValueError("ZegCLIP needs at least one corrected mask to train on.")
    cfg = cfg or ZegCLIPConfig()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = bundle.device
    text = TextEmbedder(bundle).classes(texts or [(name,) for name in classes]).to(device)
    model = ZegCLIP(bundle.visual, cfg).to(device).train()
    cuda = device.type == "cuda"

    def batch_loss(step: int) -> torch.Tensor:
        batch = [_crop(rng.choice(samples), classes, size, rng, bundle) for _ in range(batch_size)]
        pixels = torch.stack([p for p, _ in batch]).to(device)
        targets = torch.stack([t for _, t in batch]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(bundle.visual, pixels, text)
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(logits, targets, cfg)

    groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
    report = train(batch_loss, groups, steps, lr, "poly", progress, should_stop)
    return model.eval(), report


#: Sigmoid floors tried when calibrating "no label" on the training masks.
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


@torch.no_grad()
def _probabilities(
    bundle: ClipBundle, model: ZegCLIP, samples: Sequence[TrainingSample], classes: Sequence[str], size: int,
    texts: Sequence[Sequence[str]] | None = None,
) -> list[tuple[torch.Tensor, np.ndarray]]:  # fmt: skip
    """Per sample: sigmoid scores [C, H, W] at the mask's size, and the target map."""
    text = TextEmbedder(bundle).classes(texts or [(name,) for name in classes]).to(bundle.device)
    out = []
    for sample in samples:
        target = target_map(sample, classes)
        work = working_size(sample.image.width, sample.image.height, size, vit.patch_size(bundle.visual))
        pixels = to_pixels(sample.image, work, bundle.mean, bundle.std)[None].to(bundle.device)
        logits = model(bundle.visual, pixels, text)
        out.append((F.interpolate(logits.float(), size=target.shape, mode="bilinear")[0].sigmoid().cpu(), target))
    return out


def _mean_iou(scored: list[tuple[torch.Tensor, np.ndarray]], classes: int, threshold: float) -> float:
    """Mean IoU over the classes present, with pixels under ``threshold`` predicted as no class."""
    predicted, truth = [], []
    for probs, target in scored:
        best, label = probs.max(dim=0)
        predicted.append(torch.where(best >= threshold, label + 1, 0).numpy())  # 0: no class
        truth.append(np.where(target == IGNORE, IGNORE, target + 1))  # NO_CLASS -> 0
    table = iou_table(predicted, truth, classes, ignore=IGNORE)[1:]
    present = table[~np.isnan(table)]
    return float(present.mean()) if present.size else 0.0


def mean_iou(
    bundle: ClipBundle, model: ZegCLIP, samples: Sequence[TrainingSample], classes: Sequence[str], size: int
) -> float:
    """Mean IoU over the classes present in the samples' masks, predicting at short side ``size``."""
    return _mean_iou(_probabilities(bundle, model, samples, classes, size), len(classes), model.cfg.mask_threshold)


def calibrate_threshold(
    bundle: ClipBundle, model: ZegCLIP, samples: Sequence[TrainingSample], classes: Sequence[str], size: int,
    texts: Sequence[Sequence[str]] | None = None,
) -> float:  # fmt: skip
    """Set the head's "no label" floor to the one that fits ``samples`` best: focal loss keeps
    sigmoid scores low, so a fixed 0.5 can leave a useful head drawing nothing. ZegCLIP itself
    gives every pixel a class; a project's masks need "none". Pass masks the head did not train
    on (``calibration_split``): on its own training masks it is overconfident."""
    if not samples:
        return model.cfg.mask_threshold  # nothing to calibrate on: the configured floor stays
    scored = _probabilities(bundle, model, samples, classes, size, texts)
    best = max(THRESHOLDS, key=lambda t: _mean_iou(scored, len(classes), t))
    model.cfg = dataclasses.replace(model.cfg, mask_threshold=best)
    return best


def load_voc_folder(directory: Path) -> tuple[list[TrainingSample], list[str]]:
    """Samples from an ``index.json`` folder (shared/data/voc-samples layout) and its class names."""
    index = json.loads((directory / "index.json").read_text())
    names = index["classes"]
    samples = []
    for image_name, entry in index["images"].items():
        ids = np.asarray(Image.open(directory / entry["mask"]))
        present = [i for i in np.unique(ids).tolist() if 0 < i < len(names)]
        relabel = np.full(256, 255, dtype=np.uint8)
        relabel[0] = 0
        for k, class_id in enumerate(present, start=1):
            relabel[class_id] = k
        image = Image.open(directory / image_name).convert("RGB")
        samples.append(TrainingSample(image, relabel[ids], tuple(names[i] for i in present)))
    classes = sorted({label for s in samples for label in s.labels})
    return samples, classes


def main(argv: list[str] | None = None) -> None:
    from common.logs import configure_logging
    from common.settings import Settings
    from worker.loading import load_clip

    parser = argparse.ArgumentParser(description="Train a ZegCLIP head on a folder of corrected masks.")
    parser.add_argument("data", type=Path, help="folder with index.json, images and class-id masks")
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=448, help="training crop side in pixels")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    bundle = load_clip(settings)
    samples, classes = load_voc_folder(args.data)

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, args.steps, loss)

    model, report = train_zegclip(
        bundle, samples, classes, steps=args.steps, batch_size=args.batch_size, size=args.size, progress=progress
    )
    calibrate_threshold(bundle, model, samples, classes, args.size)
    miou = mean_iou(bundle, model, samples, classes, args.size)
    save_head(
        model,
        args.out,
        {"classes": classes, "base_model": settings.model_version, "steps": args.steps, "train_miou": miou},
    )
    log.info("saved %s: %d samples, %d classes, train mIoU %.3f, %.0f s", args.out, len(samples), len(classes),
             miou, report.seconds)  # fmt: skip


if __name__ == "__main__":
    main()
