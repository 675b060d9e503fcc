"""Splitting texts into sentences, for features that average over a text's sentences."""

from __future__ import annotations

import re

import numpy as np

# A sentence ends at . ! or ? followed by white space; fragments of two characters or fewer
# (stray punctuation, initials) are dropped.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+")


def split_sentences(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(sentences, owner): every text's sentences in order, and owner[i] = the index of the text
    sentence i came from. A text with no sentence longer than two characters is its own sentence,
    so every text owns at least one."""
    sentences: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        parts = [p.strip() for p in _BOUNDARY.split(text)]
        parts = [p for p in parts if len(p) > 2] or [text]
        sentences += parts
        owner += [i] * len(parts)
    return sentences, np.asarray(owner, dtype=np.int64)


def mean_by_owner(rows: np.ndarray, owner: np.ndarray, count: int) -> np.ndarray:
    """(count, d): the mean of the rows each owner holds (every owner must hold one)."""
    sums = np.zeros((count, rows.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, rows)
    return sums / np.bincount(owner, minlength=count)[:, None]
