"""Text features: cached sentence embeddings, NRC EmoLex lexicon features, their assembly."""

from .cache import EmbeddingCache, cache_root
from .encoder import DEFAULT_MODEL, MAX_CHARS, TextEncoder, clean_texts
from .features import FeatureExtractor
from .lexicon import FEATURE_NAMES, lexicon_features

__all__ = ["DEFAULT_MODEL", "EmbeddingCache", "FEATURE_NAMES", "FeatureExtractor", "MAX_CHARS",
           "TextEncoder", "cache_root", "clean_texts", "lexicon_features"]
