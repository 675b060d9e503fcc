"""GoEmotions (Demszky et al., ACL 2020): Reddit comments, 27 emotions + neutral, multi-label.

Files: {split}.tsv without header (text, comma-separated label ids, comment id).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._io import corpus_file, read_table

LABELS = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip

# The paper's grouping of the 27 emotions into Ekman's six basic emotions (+ neutral).
EKMAN = {
    "anger": ("anger", "annoyance", "disapproval"),
    "disgust": ("disgust",),
    "fear": ("fear", "nervousness"),
    "joy": ("joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism",
            "relief", "pride", "admiration", "desire", "caring"),
    "sadness": ("sadness", "disappointment", "embarrassment", "grief", "remorse"),
    "surprise": ("surprise", "realization", "confusion", "curiosity"),
    "neutral": ("neutral",),
}  # fmt: skip


def load(path=None, split: str = "train") -> pd.DataFrame:
    """Columns: text (str), labels (tuple of label ids, sorted), id (str)."""
    file = corpus_file(path, "goemotions", f"{split}.tsv")
    df = read_table(file, ["text", "labels", "id"], sep="\t", header=None, names=["text", "labels", "id"],
                    dtype=str, keep_default_na=False, quoting=3)
    try:
        df["labels"] = [tuple(sorted(int(i) for i in s.split(","))) for s in df["labels"]]
    except ValueError as err:
        raise ValueError(f"{file}: the second column must hold comma-separated label ids ({err})") from err
    bad = [ls for ls in df["labels"] if not ls or min(ls) < 0 or max(ls) >= len(LABELS)]
    if bad:
        raise ValueError(f"{file}: label ids must lie in [0, {len(LABELS) - 1}], got {bad[0]}")
    return df


def multi_hot(labels, num_labels: int = len(LABELS)) -> np.ndarray:
    """(n, num_labels) float32 indicator matrix from sequences of label ids."""
    out = np.zeros((len(labels), num_labels), dtype=np.float32)
    for row, ids in enumerate(labels):
        out[row, list(ids)] = 1.0
    return out


def ekman_matrix() -> np.ndarray:
    """(28, 7) 0/1 matrix mapping GoEmotions labels to EKMAN's groups (in EKMAN's order)."""
    m = np.zeros((len(LABELS), len(EKMAN)), dtype=np.float32)
    for j, members in enumerate(EKMAN.values()):
        for name in members:
            m[LABELS.index(name), j] = 1.0
    return m
