"""Feature assembly: sentence embedding followed by lexicon features, one row per text."""

from __future__ import annotations

import numpy as np

from .encoder import TextEncoder, clean_texts
from .lexicon import NUM_FEATURES, lexicon_features


class FeatureExtractor:
    """texts -> (n, encoder dim + NUM_FEATURES) float32. Embeddings go through the cache."""

    def __init__(self, encoder: TextEncoder | None = None):
        self.encoder = encoder if encoder is not None else TextEncoder()

    def __call__(self, texts, *, progress: bool = False) -> np.ndarray:
        texts = clean_texts(texts)
        if not texts:
            raise ValueError("texts: expected at least one text, got none")
        emb = self.encoder.encode(texts, progress=progress)
        return np.hstack([emb, lexicon_features(texts)]).astype(np.float32, copy=False)

    def dim(self, embedding_dim: int) -> int:
        return embedding_dim + NUM_FEATURES
