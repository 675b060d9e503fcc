"""MELD (Poria et al., ACL 2019): Friends dialogues, 7 emotions, with speakers.

Files: {split}_sent_emo.csv with Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ._io import corpus_file, read_table

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
# The official test split's label counts as published with the corpus (2,610 utterances; the
# paper's table of dataset statistics), in LABELS order. Only counts: used to read a dev score
# at the test split's class mix (`metrics.weighted_f1_at_class_mix`), never for training.
TEST_LABEL_COUNTS = (1256, 402, 281, 345, 208, 68, 50)


@dataclass(frozen=True)
class Dialogue:
    id: int
    speakers: tuple[str, ...]
    texts: tuple[str, ...]
    emotions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def load(path=None, split: str = "train") -> pd.DataFrame:
    """Columns: dialogue_id, utterance_id, speaker, text, emotion, sentiment; in dialogue order."""
    file = corpus_file(path, "meld", f"{split}_sent_emo.csv")
    cols = ["Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
    df = read_table(file, cols, keep_default_na=False)
    df = df.rename(columns={"Utterance": "text", "Speaker": "speaker", "Emotion": "emotion",
                            "Sentiment": "sentiment", "Dialogue_ID": "dialogue_id", "Utterance_ID": "utterance_id"})
    unknown = sorted(set(df["emotion"]) - set(LABELS))
    if unknown:
        raise ValueError(f"{file}: unknown emotion(s) {unknown}; expected {list(LABELS)}")
    df = df[["dialogue_id", "utterance_id", "speaker", "text", "emotion", "sentiment"]]
    return df.sort_values(["dialogue_id", "utterance_id"], kind="stable").reset_index(drop=True)


def dialogues(df: pd.DataFrame) -> list[Dialogue]:
    """Group a loaded split into dialogues, utterances in order."""
    return [
        Dialogue(int(did), tuple(g["speaker"]), tuple(g["text"]), tuple(g["emotion"]))
        for did, g in df.groupby("dialogue_id", sort=True)
    ]
