"""The label vocabulary a job scores against: the project's labels, then the background words.
Shared by prediction and training, so training does not import the inference pipeline for it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.jobs import ClassLabel


@dataclass(frozen=True)
class ClassBank:
    """The texts the models score against: the project's labels first, then background words.
    A label that appears in several controls with the same words is one class."""

    synonyms: tuple[tuple[str, ...], ...]
    n_labels: int
    index: dict[tuple[str, ...], int]

    @classmethod
    def build(cls, labels: Iterable[ClassLabel], background: tuple[str, ...]) -> ClassBank:
        texts = list(dict.fromkeys(label.texts for label in labels))
        taken = {text.lower() for group in texts for text in group}
        extra = [(word,) for word in dict.fromkeys(background) if word.lower() not in taken]
        return cls(tuple(texts + extra), len(texts), {group: i for i, group in enumerate(texts)})
