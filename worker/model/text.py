"""Class text embeddings: a prompt-template ensemble per word, cached for the model's lifetime."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from worker.model.bundle import ClipBundle, autocast

log = logging.getLogger(__name__)

#: CLIP's 80 ImageNet prompts plus the five scene prompts TagCLIP adds for multi-object photos.
TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

_TEXT_BATCH = 256


#: Word embeddings kept per model (least recently used dropped first): each is one E-dim vector
#: (2-3 kB), and label words come from untrusted label configs, so the cache has a bound.
CACHED_WORDS = 10_000


class TextEmbedder:
    """Embeds words with a template ensemble; each word is encoded once per loaded model (within
    the last ``CACHED_WORDS`` used), so a label set that changes by one label costs one word."""

    def __init__(self, bundle: ClipBundle, templates: Sequence[str] = TEMPLATES, cached: int = CACHED_WORDS) -> None:
        self.bundle = bundle
        self.templates = tuple(templates)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cached = cached
        self._lock = threading.Lock()

    def words(self, words: Sequence[str]) -> Tensor:
        """[len(words), E], each row normalize(mean_t normalize(encode(template_t(word))))."""
        with self._lock:
            unique = list(dict.fromkeys(words))
            missing = [w for w in unique if w not in self._cache]
            found = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
            for word in unique:
                found[word] = found.get(word, self._cache.get(word))
                self._cache[word] = found[word]
                self._cache.move_to_end(word)
            while len(self._cache) > self._cached:
                self._cache.popitem(last=False)
            return torch.stack([found[w] for w in words])

    def classes(self, synonyms: Sequence[Sequence[str]]) -> Tensor:
        """[C, E]: a class is the normalised mean of its synonyms' embeddings."""
        flat = [w for group in synonyms for w in group]
        embedded = self.words(flat)
        rows, start = [], 0
        for group in synonyms:
            rows.append(embedded[start : start + len(group)].mean(dim=0))
            start += len(group)
        return F.normalize(torch.stack(rows), dim=-1)

    @torch.no_grad()
    def _encode(self, words: list[str]) -> list[Tensor]:
        """In the bundle's precision (``PRECISION``): a new label set's 85 prompts per word are the
        one wait a project's first job has (20 labels on 2 CPU cores: 8 s in fp32, 4.5 s in bf16,
        embeddings within 1e-4 in cosine)."""
        model, device = self.bundle.model, self.bundle.device
        step = max(1, _TEXT_BATCH // len(self.templates))  # whole words per batch: only their means are kept
        means = []
        for start in range(0, len(words), step):
            prompts = [t.format(w) for w in words[start : start + step] for t in self.templates]
            tokens = self.bundle.tokenizer(prompts).to(device)
            with autocast(self.bundle):
                embedded = F.normalize(encode_text_trimmed(model, tokens).float(), dim=-1)
            means.append(embedded.reshape(-1, len(self.templates), embedded.shape[-1]).mean(dim=1))
        log.debug("encoded %d words (%d prompts)", len(words), len(words) * len(self.templates))
        return list(F.normalize(torch.cat(means), dim=-1))


def encode_text_trimmed(model: open_clip.CLIP, tokens: Tensor) -> Tensor:
    """``model.encode_text`` without the padding: the causal mask means no token sees the ones
    after it, and pooling reads the end-of-text token, so cutting the sequence after the longest
    prompt's last token gives the same embeddings at a fraction of the cost (77 -> ~15 tokens)."""
    plain = isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None
    if not plain:
        return model.encode_text(tokens)
    n = max(1, int((tokens != 0).sum(dim=1).max()))
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens, "argmax")
    projection = model.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
