"""NRC EmoLex word-emotion features through the `nrclex` package (which ships the lexicon;
its terms ask not to redistribute it, so affectkit depends on the package instead of a copy).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

# EmoLex's eight Plutchik emotions and two sentiments, in a fixed order.
CATEGORIES = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust",
              "negative", "positive")  # fmt: skip
# Per category: share of tokens carrying it, and whether any token does; then 4 surface cues.
FEATURE_NAMES = (
    tuple(f"emolex_{c}_rate" for c in CATEGORIES)
    + tuple(f"emolex_{c}_any" for c in CATEGORIES)
    + ("log_tokens", "exclamations", "questions", "uppercase_share")
)
NUM_FEATURES = len(FEATURE_NAMES)

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, tuple[int, ...]]:
    from nrclex import NRCLex

    raw = NRCLex(None).__lexicon__  # word -> list of category names
    index = {c: i for i, c in enumerate(CATEGORIES)}
    return {w: tuple(index[c] for c in cats if c in index) for w, cats in raw.items()}


def lexicon_features(texts) -> np.ndarray:
    """(n, NUM_FEATURES) float32 features of each text (lower-cased word tokens, no lemmatising)."""
    lex = _lexicon()
    out = np.zeros((len(texts), NUM_FEATURES), dtype=np.float32)
    k = len(CATEGORIES)
    for row, text in enumerate(texts):
        tokens = _TOKEN.findall(text.lower())
        counts = np.zeros(k, dtype=np.float32)
        for tok in tokens:
            for c in lex.get(tok, ()):
                counts[c] += 1
        n = max(len(tokens), 1)
        letters = sum(ch.isalpha() for ch in text)
        out[row, :k] = counts / n
        out[row, k:2 * k] = counts > 0
        out[row, 2 * k:] = (np.log1p(len(tokens)), min(text.count("!"), 5), min(text.count("?"), 5),
                            sum(ch.isupper() for ch in text) / max(letters, 1))
    return out
