"""The character n-gram ridge (the empathy model's second view) against a float64 closed form,
on planted signals, through save and load, and blended inside RegressionModel."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from affectkit.models.ngram_ridge import CharNgramRidge
from affectkit.models.regression import RegressionModel
from affectkit.text.ngrams import hashed_char_ngrams
from _support import numpy_rng


WORDS = ["river", "calm", "table", "storm", "quiet", "lamp", "green", "paper", "stone", "cloud", "bright", "soft"]


def _texts(rng, n, marker="grief", p=0.5):
    """Random word salads; a share of them carry `marker` (and its count is the signal)."""
    texts, counts = [], []
    for _ in range(n):
        words = list(rng.choice(WORDS, rng.integers(4, 12)))
        c = int(rng.integers(0, 3)) if rng.random() < p else 0
        words += [marker] * c
        rng.shuffle(words)
        texts.append(" ".join(words))
        counts.append(c)
    return texts, np.array(counts, dtype=np.float64)


def _closed_form(train, y, test, alpha, n_features):
    """Sublinear TF-IDF (smoothed IDF, L2 rows) and dual ridge, written out in float64."""
    a = hashed_char_ngrams(train, n_features).toarray()
    b = hashed_char_ngrams(test, n_features).toarray()
    df = (a > 0).sum(0)
    idf = np.log((1 + len(train)) / (1 + df)) + 1

    def tfidf(m):
        m = np.where(m > 0, 1 + np.log(np.where(m > 0, m, 1)), 0) * idf
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-300)

    a, b = tfidf(a), tfidf(b)
    mean = y.mean(0)
    dual = np.linalg.solve(a @ a.T + alpha * np.eye(len(a)), y - mean)
    return b @ (a.T @ dual) + mean


@pytest.mark.parametrize("n_features", [2**10, 2**16])
def test_fit_predict_matches_the_closed_form(n_features, gen):
    rng = numpy_rng(gen)
    train, c = _texts(rng, int(rng.integers(40, 90)))
    test, _ = _texts(rng, 13)
    y = np.stack([c + rng.normal(0, 0.3, len(c)), -2 * c + rng.normal(0, 0.3, len(c))], 1)
    alpha = float(rng.uniform(0.5, 5))
    model = CharNgramRidge.fit(train, y, alpha=alpha, n_features=n_features)
    np.testing.assert_allclose(model.predict(test), _closed_form(train, y, test, alpha, n_features), rtol=1e-7, atol=1e-9)


def test_learns_a_planted_signal_per_target(gen):
    rng = numpy_rng(gen)
    train, c = _texts(rng, 300)
    test, c_test = _texts(rng, 200)
    model = CharNgramRidge.fit(train, np.stack([c, 10 - 3 * c], 1), alpha=1.0, n_features=2**14)
    pred = model.predict(test)
    assert pearsonr(pred[:, 0], c_test)[0] > 0.9, "the marker's count is in its character n-grams"
    assert pearsonr(pred[:, 1], c_test)[0] < -0.9, "the second target falls with it"
    assert abs(pred[:, 1].mean() - (10 - 3 * c_test.mean())) < 0.5, "each target keeps its own mean"


def test_saved_tensors_predict_the_same(gen):
    rng = numpy_rng(gen)
    train, c = _texts(rng, 60)
    test, _ = _texts(rng, 9)
    model = CharNgramRidge.fit(train, c[:, None], alpha=2.0, n_features=2**12)
    tensors = model.tensors("x.")
    assert set(tensors) == {"x.idf", "x.coef", "x.intercept"} and tensors["x.coef"].shape == (1, 2**12)
    again = CharNgramRidge.from_tensors(tensors, "x.")
    np.testing.assert_allclose(again.predict(test), model.predict(test), rtol=1e-5, atol=1e-5)


def test_a_blend_weight_outside_0_1_is_refused():
    config = {"kind": "empathy", "targets": ["e"], "scale": [1, 7], "encoder": "x", "in_dim": 1, "out_dim": 1,
              "hidden": 0, "char_ngrams": {"weight": 1.5}}
    tensors = {"head.mean": torch.zeros(1), "head.std": torch.ones(1), "head.net.1.weight": torch.zeros(1, 1),
               "head.net.1.bias": torch.zeros(1), "target_mean": torch.zeros(1), "target_std": torch.ones(1),
               "char_ngrams.idf": torch.ones(4), "char_ngrams.coef": torch.zeros(1, 4), "char_ngrams.intercept": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"char_ngrams.weight in \[0, 1\], got 1.5"):
        RegressionModel(tensors, config, _Features())


def test_bad_tensors_are_refused():
    with pytest.raises(ValueError, match="missing 'p.coef'"):
        CharNgramRidge.from_tensors({"p.idf": torch.ones(8), "p.intercept": torch.zeros(1)}, "p.")
    with pytest.raises(ValueError, match=r"expected idf \(B,\), coef \(T, B\), intercept \(T,\)"):
        CharNgramRidge(np.ones(8), np.zeros((2, 7)), np.zeros(2))


class _Features:
    """A stand-in extractor: the first feature is the text's length."""

    def __call__(self, texts, progress=False):
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def _blended_model(rng, weight):
    train, c = _texts(rng, 50)
    ngrams = CharNgramRidge.fit(train, np.stack([c, 2 * c], 1), alpha=1.0, n_features=2**12)
    config = {"kind": "empathy", "targets": ["empathy", "distress"], "scale": [1, 7], "encoder": "x", "in_dim": 2,
              "out_dim": 2, "hidden": 0, "char_ngrams": {"n_features": 2**12, "alpha": 1.0, "weight": weight}}
    w = torch.tensor([[0.05, 0.0], [0.0, 0.0]])
    tensors = {"head.mean": torch.zeros(2), "head.std": torch.ones(2), "head.net.1.weight": w,
               "head.net.1.bias": torch.tensor([0.1, 0.2]), "target_mean": torch.tensor([4.0, 3.0]),
               "target_std": torch.tensor([1.0, 2.0]), **ngrams.tensors("char_ngrams.")}
    return RegressionModel(tensors, config, _Features()), ngrams


def test_regression_model_blends_the_two_views(tmp_path, gen):
    rng = numpy_rng(gen)
    weight = float(rng.uniform(0.2, 0.4))  # away from 0.5, where w and 1 - w agree
    model, ngrams = _blended_model(rng, weight)
    texts, _ = _texts(rng, 7)
    lengths = np.array([len(t) for t in texts], dtype=np.float64)
    head = np.stack([(0.05 * lengths + 0.1) * 1.0 + 4.0, np.full(len(texts), 0.2 * 2.0 + 3.0)], 1)
    expected = np.clip((1 - weight) * head + weight * ngrams.predict(texts), 1, 7)
    np.testing.assert_allclose(model.predict(texts), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="texts: this model also reads character n-grams"):
        model.predict_features(_Features()(texts))
    with pytest.raises(ValueError, match=r"texts: expected one text per feature row \(7\), got 1"):
        model.predict_features(_Features()(texts), texts[:1])
    from affectkit.models.base import read_weights

    tensors, config = read_weights(model.save(tmp_path))
    again = RegressionModel(tensors, config, _Features())
    np.testing.assert_allclose(again.predict(texts), model.predict(texts), rtol=1e-5)
