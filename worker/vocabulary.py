"""The label vocabulary a job scores against: the project's labels, then their competitors (the
background words and the distractor concepts). Shared by prediction and training, so training does
not import the inference pipeline for it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from common.errors import SettingsError
from common.jobs import ClassLabel

#: The shipped open vocabulary of distractor concepts (``DISTRACTORS=builtin``).
BUILTIN_DISTRACTORS = Path(__file__).with_name("data") / "distractors.txt"
#: Competitors whose text embedding is at least this close to a label's (a synonym, for the model)
#: or to a competitor kept before them (the same concept twice) are left out: the first would take
#: a label's own pixels, the second would count one concept several times in the softmax.
SAME_CONCEPT = 0.95


@cache
def distractor_words(setting: str) -> tuple[str, ...]:
    """``DISTRACTORS``: ``builtin``, ``none``, or the path of a text file, one concept per line
    (``#`` starts a comment)."""
    if setting == "none":
        return ()
    path = BUILTIN_DISTRACTORS if setting == "builtin" else Path(setting)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SettingsError(f"DISTRACTORS={setting}: cannot read {path}: {e.strerror}. "
                            "Use builtin, none, or the path of a file with one concept per line.") from e  # fmt: skip
    return tuple(dict.fromkeys(w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")))


@dataclass(frozen=True)
class ClassBank:
    """The texts the models score against: the project's labels first, then their competitors.
    A label that appears in several controls with the same words is one class."""

    synonyms: tuple[tuple[str, ...], ...]
    n_labels: int
    index: dict[tuple[str, ...], int]
    n_background: int = 0  # the first competitors: background words (masks compete with these only)

    @classmethod
    def build(
        cls, labels: Iterable[ClassLabel], background: Iterable[str], distractors: Iterable[str] = ()
    ) -> ClassBank:
        """Labels, then background words, then distractors; a word that is one of the labels'
        texts (or came before) is left out."""
        texts = list(dict.fromkeys(label.texts for label in labels))
        taken = {text.lower() for group in texts for text in group}
        extra: list[tuple[str, ...]] = []
        n_background = 0
        for group, words in enumerate((background, distractors)):
            for word in words:
                if word.lower() not in taken:
                    taken.add(word.lower())
                    extra.append((word,))
                    n_background += group == 0
        index = {group: i for i, group in enumerate(texts)}
        return cls(tuple(texts + extra), len(texts), index, n_background)

    def mask_rows(self, kept: Tensor) -> list[int]:
        """Of the rows ``distinct_competitors`` kept (positions in its result), the labels' and the
        background words': what masks compete with. Distractors decide tags, not pixels: on one
        object, an attribute or a part ("red" and "star", "car" and "wheel") would take the label's
        pixels."""
        return [i for i, row in enumerate(kept.tolist()) if row < self.n_labels + self.n_background]


def distinct_competitors(text: Tensor, n_labels: int) -> Tensor:
    """Row indices of ``text`` [C, E] (normalised; labels first) to score against: every label,
    and each competitor that is not the same concept as a label or as a competitor kept before it
    (``SAME_CONCEPT``)."""
    similarity = text.float() @ text.float().T
    kept = list(range(n_labels))
    for row in range(n_labels, len(text)):
        if not kept or similarity[row, kept].max() < SAME_CONCEPT:
            kept.append(row)
    return torch.tensor(kept, dtype=torch.long)
