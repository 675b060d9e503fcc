"""Retrieval of similar texts: `TextIndex` (texts + embeddings + labels/scores, searchable under
a label filter) and the training corpora as cached indexes (what `model.nearest_examples` uses)."""

from .corpus import CORPORA, MODEL_CORPUS, TrainingDataMissing, training_index
from .text_index import Example, TextIndex

__all__ = ["CORPORA", "Example", "MODEL_CORPUS", "TextIndex", "TrainingDataMissing", "training_index"]
