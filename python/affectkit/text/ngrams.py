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


def hashed_char_ngrams(texts, n_features: int) -> sp.csr_matrix:
    """(n, n_features) counts of character 2- to 5-grams inside word boundaries (words padded
    with a space), lower-cased, float64 CSR. Character n-grams carry spelling, inflection and
    punctuation style, which word embeddings smooth away (see models/ngram_ridge.py)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), n_features=n_features, alternate_sign=False,
                            norm=None, lowercase=True, dtype="float64")
    return vec.transform(list(texts)).tocsr()
