"""Ridge regression over hashed character n-grams with TF-IDF weights.

A second view of a text for the regression models: the sentence encoders see meaning, the
character n-grams see wording (how often "I feel", "sad", "!" or "so so" appear). On the
empathy essays the two err differently, so blending their predictions beats either alone (see
empathy_training.py for the numbers). The n-grams are hashed, so the model stores no
vocabulary and no text of its corpus: only an IDF weight and a coefficient per bucket.
"""

from __future__ import annotations

import numpy as np
import torch

from ..text.ngrams import hashed_char_ngrams


class CharNgramRidge:
    """texts -> (n, targets): sublinear TF-IDF of hashed character 2..5-grams (L2-normalised
    rows), then a linear map fitted by ridge regression around the targets' mean."""

    def __init__(self, idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray):
        from sklearn.feature_extraction.text import TfidfTransformer

        if idf.ndim != 1 or coef.ndim != 2 or coef.shape[1] != idf.shape[0] or intercept.shape != (coef.shape[0],):
            raise ValueError(f"CharNgramRidge: expected idf (B,), coef (T, B), intercept (T,), got {idf.shape}, "
                             f"{coef.shape}, {intercept.shape}")
        self.n_features = idf.shape[0]
        self.coef, self.intercept = coef.astype(np.float64), intercept.astype(np.float64)
        self.tfidf = TfidfTransformer(sublinear_tf=True)
        self.tfidf.idf_ = idf.astype(np.float64)

    @classmethod
    def fit(cls, texts, y: np.ndarray, *, alpha: float, n_features: int = 2**16) -> CharNgramRidge:
        from sklearn.feature_extraction.text import TfidfTransformer
        from sklearn.linear_model import Ridge

        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        counts = hashed_char_ngrams(texts, n_features)
        tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        # More buckets than texts: "cholesky" solves the n x n kernel system exactly.
        mean = y.mean(0)
        ridge = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(tfidf.transform(counts), y - mean)
        return cls(tfidf.idf_, np.atleast_2d(ridge.coef_), mean)

    def predict(self, texts) -> np.ndarray:
        x = self.tfidf.transform(hashed_char_ngrams(texts, self.n_features))
        return np.asarray(x @ self.coef.T) + self.intercept

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}idf": torch.from_numpy(self.tfidf.idf_.astype(np.float32)),
                f"{prefix}coef": torch.from_numpy(self.coef.astype(np.float32)),
                f"{prefix}intercept": torch.from_numpy(self.intercept.astype(np.float32))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> CharNgramRidge:
        try:
            parts = [tensors[f"{prefix}{k}"].double().numpy() for k in ("idf", "coef", "intercept")]
        except KeyError as err:
            raise ValueError(f"tensors: expected the character n-gram tensors {prefix}idf/coef/intercept, "
                             f"missing {err.args[0]!r}") from None
        return cls(*parts)
