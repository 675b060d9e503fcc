"""EmoBank (Buechel & Hahn, EACL 2017): sentence-level valence, arousal, dominance on 1..5."""

from __future__ import annotations

import pandas as pd

from ._io import corpus_file, read_table

DIMENSIONS = ("V", "A", "D")


def load(path=None, split: str = "train", filename: str = "emobank_train_dev.csv") -> pd.DataFrame:
    """Columns: id, text, V, A, D. `split` selects rows by the file's `split` column."""
    file = corpus_file(path, "emobank", filename)
    df = read_table(file, ["id", "split", "V", "A", "D", "text"], keep_default_na=False)
    splits = sorted(set(df["split"]))
    if split not in splits:
        raise ValueError(f"split: expected one of {splits} in {file}, got {split!r}")
    df = df[df["split"] == split]
    return df[["id", "text", *DIMENSIONS]].reset_index(drop=True)
