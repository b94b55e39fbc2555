"""Pretrain a tiny CLIP on the toy world, and measure it zero-shot.

    python -m bench.toy_clip --minutes 25 --out bench/models/toy-clip

writes an open_clip model directory (``open_clip_config.json`` + ``open_clip_model.safetensors``)
that the service loads with ``MODEL_CHECKPOINT=bench/models/toy-clip``, and ``training.json`` with
the recipe and the zero-shot accuracies measured at the end. The model is built from the explicit
config below (random init), trained with InfoNCE on scenes generated on the fly.

Captions put the same words in the same prompts the service uses (CLIP's 80 ImageNet templates
and TagCLIP's five), filled with "red star", "red" or "star", plus multi-object captions, so that
the service's template ensemble means something to this model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from bench.toyworld import COLOURS, SHAPES, Scene, caption, render_scene, scenes
from worker.model.preprocess import to_pixels
from worker.model.text import TEMPLATES

#: ViT with 8-pixel patches on 64-pixel scenes (an 8x8 grid), 6 blocks so TagCLIP's layer choices
#: are meaningful; a narrow text tower, since open_clip's 49408-token table dominates the size.
TOY_CLIP: dict = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
SCENE_SIZE = 64
HELD_OUT_SEED = 10_000  # zero-shot accuracy is measured on scenes from this seed


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Half template prompts about the main object ("a photo of a red star."), half toy captions."""
    if not scene.objects or rng.random() < 0.5:
        return caption(scene, rng)
    main = scene.objects[0]
    phrase = (f"{main.colour} {main.shape}", main.colour, main.shape)[rng.choice(3, p=[0.6, 0.2, 0.2])]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(phrase)


class ToyStream(IterableDataset):
    """Endless (pixels, caption) pairs; each worker draws from its own seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(self.seed + (info.id if info else 0))
        while True:
            scene = render_scene(rng, SCENE_SIZE)
            yield to_pixels(scene.image, (SCENE_SIZE, SCENE_SIZE), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), \
                training_caption(scene, rng)  # fmt: skip


@torch.no_grad()
def zero_shot_accuracy(model: open_clip.CLIP, tokenizer, count: int = 400) -> dict[str, float]:
    """Colour and shape accuracy on single-object held-out scenes: every colour x shape prompt is
    scored, and each attribute's probability is summed over the other (a marginal zero-shot)."""
    held_out = scenes(HELD_OUT_SEED, count, SCENE_SIZE, max_objects=1)
    held_out = [s for s in held_out if s.objects]
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c} {s}." for c, s in pairs])), dim=-1)
    pixels = torch.stack([to_pixels(s.image, (SCENE_SIZE, SCENE_SIZE), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
                          for s in held_out])  # fmt: skip
    probs = (100 * F.normalize(model.encode_image(pixels), dim=-1) @ text.T).softmax(dim=-1)
    by_pair = probs.reshape(len(held_out), len(COLOURS), len(SHAPES))
    colour = by_pair.sum(2).argmax(1)
    shape = by_pair.sum(1).argmax(1)
    truth_colour = torch.tensor([list(COLOURS).index(s.objects[0].colour) for s in held_out])
    truth_shape = torch.tensor([SHAPES.index(s.objects[0].shape) for s in held_out])
    return {
        "colour": float((colour == truth_colour).float().mean()),
        "shape": float((shape == truth_shape).float().mean()),
        "scenes": len(held_out),
    }


def save_model_dir(model: open_clip.CLIP, directory: Path, used_tokens: set[int]) -> None:
    """An open_clip model directory in fp16. Rows of the token table that training never touched
    are zeroed (they held random init), which lets git store the file compactly."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TOY_CLIP,
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    keep = torch.zeros(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[sorted(used_tokens)] = True
    state["token_embedding.weight"][~keep] = 0
    save_file(state, str(directory / "open_clip_model.safetensors"))


def train(minutes: float, out: Path, seed: int = 0, batch_size: int = 128, lr: float = 5e-4) -> dict:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TOY_CLIP)
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])
    loader = DataLoader(ToyStream(seed), batch_size=batch_size, num_workers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    budget, started = minutes * 60, time.monotonic()
    used_tokens: set[int] = set()
    step, log = 0, []
    warmup = 100
    for pixels, texts in loader:
        elapsed = time.monotonic() - started
        if elapsed > budget:
            break
        progress = elapsed / budget
        for group in optimizer.param_groups:  # linear warm-up, then cosine over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        tokens = tokenizer(list(texts))
        used_tokens.update(tokens.unique().tolist())
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        labels = torch.arange(len(texts))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": round(loss.item(), 4)})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    accuracy = zero_shot_accuracy(model, tokenizer)
    save_model_dir(model, out, used_tokens)
    saved = open_clip.create_model(f"local-dir:{out}").eval()  # what the service will load
    record = {
        "recipe": {"minutes": minutes, "seed": seed, "batch_size": batch_size, "lr": lr, "steps": step,
                   "scene_size": SCENE_SIZE, "threads": torch.get_num_threads()},
        "zero_shot_fp32": accuracy,
        "zero_shot": zero_shot_accuracy(saved, tokenizer),
        "log": log,
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=Path("bench/models/toy-clip"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    record = train(args.minutes, args.out, args.seed, args.batch_size)
    print(json.dumps({"out": str(args.out), "zero_shot": record["zero_shot"]}))


if __name__ == "__main__":
    main()
