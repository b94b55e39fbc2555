"""Pretrain a tiny CLIP on the toy world, and measure it zero-shot.

    python -m bench.toy_clip --minutes 90 --out bench/models/toy-clip

writes an open_clip model directory (``open_clip_config.json`` + ``open_clip_model.safetensors``)
that the service loads with ``MODEL_CHECKPOINT=bench/models/toy-clip``, and ``training.json`` with
the recipe, the loss log and the zero-shot accuracies measured at the end. The model is built from
the explicit config below (random init) and trained with CLIP's objective only (symmetric InfoNCE
between images and captions) on views generated on the fly. ``--checkpoint-minutes`` also writes
the model so far every so often, so a long run can be looked at (and stopped) early.

Why the views are crops (toy world v2): a CLIP's patch tokens mean something when it has seen
objects at every scale, close-ups included, each image captioned with what it shows. So every
training image is a random square view of a 128-pixel scene, from a quarter of its side (a
close-up of one object) to all of it (several objects), resized to the model's 64 pixels, and
captioned with the objects mostly inside it, largest first, each bound to its colour ("a red star
and a blue circle on grass."), or with its background alone when it shows none. Single-object views
are often captioned with the service's own prompts (CLIP's 80 ImageNet templates and TagCLIP's
five) filled with "red star", "red" or "star", so the service's template ensemble means something
to this model.

One-colour batches: CLIP's objective learns what tells a batch's captions apart, and in the toy
world colour alone nearly always does, so the served v2 (trained without them) learnt colours
perfectly and shapes barely (zero-shot 0.32). With ``--one-colour-every n`` every n-th batch draws
all its objects in one colour, so only shapes (and backgrounds) tell its captions apart. ``--init``
continues from a model directory, whose ``training.json`` is kept inside the new one
(``init_training``): a model's record holds every stage. ``bench/models/toy-clip-v4`` is v2
continued 60 CPU minutes with ``--one-colour-every 2 --lr 3e-4`` (v3, shape zero-shot 0.44), then 60
more with ``--init`` v3 ``--one-colour-every 4 --lr 3e-4 --seed 1`` (shape 0.67, colour 1.00).
Measured by ``bench.quality`` it was not adopted: shapes gained a little, colour projects lost more
(docs/quality.md).

Main-subject captions, for testing why TagCLIP's local route loses to the global embedding here:
v2's captions name every object of a view, so its class token learnt to be multi-label. Web
captions name the main subject, which is what TagCLIP's local route makes up for. With
``--main-subject-rate p`` a share p of the views showing several objects is captioned with the
largest one alone. ``bench/models/toy-clip-v5`` is v2's recipe with ``--main-subject-rate 1.0``:
its class token under-scores the objects its captions left out, as TagCLIP argues CLIP's does, but
its patches lose them more, so TagCLIP's local route still trails the global embedding; not adopted
(docs/quality.md).

On a GPU (``scripts/gpu-run``, docs/benchmarks.md) the model is not what limits the pace: drawing
scenes is, in ``--workers`` processes, which also tokenize the captions. ``--views-per-scene k``
cuts k views from each scene drawn, about three times the views a second at k = 4.
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
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset

from bench.toyworld import COLOURS, SHAPES, Scene, crop, render_scene, scenes
from worker.model.preprocess import to_pixels
from worker.model.text import TEMPLATES

#: ViT with 8-pixel patches on 64-pixel scenes (an 8x8 grid), 6 blocks so TagCLIP's layer choices
#: are meaningful; a narrow text tower, since open_clip's 49408-token table dominates the size.
TOY_CLIP: dict = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
INPUT_SIZE = 64  # the model's input
SCENE_SIZE = 128  # the scenes views are cut from, and that the benchmark labels
MIN_VIEW = 0.25  # the smallest view's side, as a share of the scene's
EMPTY_RATE = 0.1  # share of scenes without any object
HELD_OUT_SEED = 10_000  # zero-shot accuracy is measured on scenes from this seed


def random_view(scene: Scene, rng: np.random.Generator) -> Scene:
    """A square view of ``scene`` whose side is log-uniform between MIN_VIEW and all of it."""
    size = scene.image.width
    side = int(round(size * np.exp(rng.uniform(np.log(MIN_VIEW), 0.0))))
    left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    return crop(scene, left, top, side)


def view_caption(view: Scene, rng: np.random.Generator, main_subject_rate: float = 0.0) -> str:
    """What the view shows: its objects, largest first (at most three), or its background. With
    probability ``main_subject_rate`` a view of several objects names its largest one alone, as a
    web caption names its main subject."""
    if not view.objects:
        return f"a photo of {view.background}." if rng.random() < 0.5 else \
            TEMPLATES[rng.integers(len(TEMPLATES))].format(view.background)  # fmt: skip
    areas = np.bincount(view.object_map.ravel(), minlength=256)[1 : len(view.objects) + 1]
    shown = [view.objects[k] for k in np.argsort(-areas, kind="stable")[:3]]
    # no draw at rate 0, so a recipe without main subjects keeps its exact captions (v2 and v3's)
    if len(shown) > 1 and main_subject_rate and rng.random() < main_subject_rate:
        shown = shown[:1]
    if len(shown) == 1 and rng.random() < 0.6:
        main = shown[0]
        phrase = (f"{main.colour} {main.shape}", main.colour, main.shape)[rng.choice(3, p=[0.6, 0.2, 0.2])]
        return TEMPLATES[rng.integers(len(TEMPLATES))].format(phrase)
    names = [f"a {o.colour} {o.shape}" for o in shown]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {view.background}." if rng.random() < 0.5 else f"{listed}."


class ToyStream(IterableDataset):
    """Endless (pixels, caption) pairs; each worker draws from its own seed. A loader's batch is
    ``batch_size`` consecutive pairs of one worker, so every ``one_colour_every``-th batch of each
    worker (0: none) can draw all its objects in one colour; ``main_subject_rate`` goes to
    ``view_caption``. ``views_per_scene`` views are cut from each scene drawn (drawing a scene
    is ~85 % of a view's time: what limits training on a GPU); 1 keeps v2's exact stream."""

    def __init__(self, seed: int, batch_size: int = 1, one_colour_every: int = 0, main_subject_rate: float = 0.0,
                 views_per_scene: int = 1):  # fmt: skip
        if views_per_scene < 1 or batch_size % views_per_scene:
            raise ValueError(f"views_per_scene={views_per_scene} must divide batch_size={batch_size}")
        self.seed, self.batch_size, self.one_colour_every = seed, batch_size, one_colour_every
        self.main_subject_rate, self.views_per_scene = main_subject_rate, views_per_scene

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng(self.seed + worker)
        colours, count = tuple(COLOURS), 0
        while True:
            batch, palette = count // self.batch_size, None
            if self.one_colour_every and batch % self.one_colour_every == self.one_colour_every - 1:
                palette = (colours[np.random.default_rng((self.seed, worker, batch)).integers(len(colours))],)
            scene = render_scene(rng, SCENE_SIZE, empty_rate=EMPTY_RATE, palette=palette)
            for _ in range(self.views_per_scene):
                view = random_view(scene, rng)
                count += 1
                yield to_pixels(view.image, (INPUT_SIZE, INPUT_SIZE), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), \
                    view_caption(view, rng, self.main_subject_rate)  # fmt: skip


def toy_tokenizer():
    """open_clip's CLIP tokenizer at the toy text tower's context length."""
    return open_clip.get_tokenizer("ViT-B-16", context_length=TOY_CLIP["text_cfg"]["context_length"])


class Tokenized(IterableDataset):
    """A stream's captions as token ids, made in the loader's worker processes: on a GPU the main
    process would otherwise spend more of each step tokenizing than training."""

    def __init__(self, stream: ToyStream) -> None:
        self.stream = stream

    def __iter__(self):
        tokenizer = toy_tokenizer()
        for pixels, caption in self.stream:
            yield pixels, tokenizer([caption])[0]


@torch.no_grad()
def zero_shot_accuracy(model: open_clip.CLIP, tokenizer, count: int = 400, device: str = "cpu") -> dict[str, float]:
    """Colour and shape accuracy on single-object held-out scenes: every colour x shape prompt is
    scored, and each attribute's probability is summed over the other (a marginal zero-shot)."""
    held_out = scenes(HELD_OUT_SEED, count, SCENE_SIZE, max_objects=1)
    held_out = [s for s in held_out if s.objects]
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {c} {s}." for c, s in pairs]).to(device)), dim=-1)
    pixels = torch.stack([to_pixels(s.image, (INPUT_SIZE, INPUT_SIZE), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
                          for s in held_out]).to(device)  # fmt: skip
    probs = (100 * F.normalize(model.encode_image(pixels), dim=-1) @ text.T).softmax(dim=-1).cpu()
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


def init_record(init: Path | None) -> dict | None:
    """The training record of the model a run continues from (its own ``init_training`` nested in
    it), so a continued model's ``training.json`` holds every stage that made it."""
    record = init / "training.json" if init is not None else None
    return json.loads(record.read_text()) if record is not None and record.is_file() else None


def train(
    minutes: float,
    out: Path,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 5e-4,
    checkpoint_minutes: float = 0.0,
    device: str = "cpu",
    workers: int = 1,
    one_colour_every: int = 0,
    init: Path | None = None,
    main_subject_rate: float = 0.0,
    views_per_scene: int = 1,
) -> dict:
    """Train for ``minutes`` of wall time (cosine schedule over that budget) and save to ``out``;
    from random weights, or from the model directory ``init``."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TOY_CLIP)
    used_tokens: set[int] = set()
    if init is not None:
        state = load_file(str(init / "open_clip_model.safetensors"))
        model.load_state_dict(state)  # fp16 on disk, copied into the fp32 parameters
        used_tokens.update(torch.nonzero(state["token_embedding.weight"].abs().sum(1)).flatten().tolist())
    model.to(device)
    tokenizer = toy_tokenizer()
    stream = Tokenized(ToyStream(seed, batch_size, one_colour_every, main_subject_rate, views_per_scene))
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, pin_memory=device.startswith("cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    budget, started = minutes * 60, time.monotonic()
    step, log, saved_at = 0, [], 0.0
    warmup = 100

    def record(zero_shot: dict) -> dict:
        return {
            "recipe": {"minutes": minutes, "seed": seed, "batch_size": batch_size, "lr": lr, "steps": step,
                       "scene_size": SCENE_SIZE, "input_size": INPUT_SIZE, "min_view": MIN_VIEW,
                       "empty_rate": EMPTY_RATE, "one_colour_every": one_colour_every,
                       "main_subject_rate": main_subject_rate, "views_per_scene": views_per_scene,
                       "init": str(init) if init else None, "device": device, "threads": torch.get_num_threads(),
                       "workers": workers},
            "zero_shot": zero_shot,
            "log": log,
            "init_training": init_record(init),
        }  # fmt: skip

    for pixels, tokens in loader:
        elapsed = time.monotonic() - started
        if elapsed > budget:
            break
        progress = elapsed / budget
        for group in optimizer.param_groups:  # linear warm-up, then cosine over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        used_tokens.update(tokens.unique().tolist())
        image = F.normalize(model.encode_image(pixels.to(device, non_blocking=True)), dim=-1)
        text = F.normalize(model.encode_text(tokens.to(device, non_blocking=True)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        labels = torch.arange(len(tokens), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log.append({"step": step, "minutes": round(elapsed / 60, 2), "loss": round(loss.item(), 4)})
            print(json.dumps(log[-1]), flush=True)
        if checkpoint_minutes and elapsed - saved_at > checkpoint_minutes * 60:
            saved_at = elapsed
            save_model_dir(model, out, used_tokens)
            model.eval()
            so_far = {"partial": True, **zero_shot_accuracy(model, tokenizer, device=device)}
            model.train()
            log.append({"step": step, "minutes": round(elapsed / 60, 2), "zero_shot": so_far})
            (out / "training.json").write_text(json.dumps(record(so_far), indent=2))
            print(json.dumps({"checkpoint": str(out), **log[-1]}), flush=True)
    model.cpu().eval()
    save_model_dir(model, out, used_tokens)
    saved = open_clip.create_model(f"local-dir:{out}").eval()  # what the service will load
    result = record(zero_shot_accuracy(saved, tokenizer))
    (out / "training.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=Path("bench/models/toy-clip"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--checkpoint-minutes", type=float, default=0.0, help="also save every so often")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing scenes")
    parser.add_argument("--one-colour-every", type=int, default=0, help="every n-th batch in one colour (0: none)")
    parser.add_argument("--init", type=Path, help="continue from this model directory")
    parser.add_argument("--main-subject-rate", type=float, default=0.0, help="views of several objects captioned "
                        "with their largest alone (a share)")  # fmt: skip
    parser.add_argument("--views-per-scene", type=int, default=1, help="views cut from each scene drawn")
    args = parser.parse_args(argv)
    record = train(args.minutes, args.out, args.seed, args.batch_size, args.lr, args.checkpoint_minutes,
                   args.device, args.workers, args.one_colour_every, args.init, args.main_subject_rate,
                   args.views_per_scene)  # fmt: skip
    print(json.dumps({"out": str(args.out), "zero_shot": record["zero_shot"]}))


if __name__ == "__main__":
    main()
