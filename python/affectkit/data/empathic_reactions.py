"""Empathic reactions to news (Buechel et al., EMNLP 2018): empathy and distress of essays (1..7)."""

from __future__ import annotations

import pandas as pd

from ._io import corpus_file, read_table

TARGETS = ("empathy", "distress")


def load(path=None, filename: str = "messages_train.csv") -> pd.DataFrame:
    """Columns: message_id, text (the essay), empathy, distress."""
    file = corpus_file(path, "empathic_reactions", filename)
    df = read_table(file, ["message_id", "essay", *TARGETS], keep_default_na=False)
    return df.rename(columns={"essay": "text"})[["message_id", "text", *TARGETS]].reset_index(drop=True)
