"""Hashed word uni- and bigrams (stateless: no vocabulary is fitted or stored, so a model
that uses them ships only its weights, never words from its training corpus)."""

from __future__ import annotations

import scipy.sparse as sp


def hashed_ngrams(texts, n_features: int) -> sp.csr_matrix:
    """(n, n_features) L2-normalised binary uni+bigram indicators, float32 CSR."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, binary=True,
                            norm="l2", lowercase=True, token_pattern=r"(?u)\b\w[\w']*\b|[!?]", dtype="float32")
    return vec.transform(list(texts)).tocsr()
