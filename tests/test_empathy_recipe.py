"""The empathy recipe: sentence splitting, ridge heads, out-of-fold scoring, emotion-augmented
features and the shipped model's ties to the text-emotion weights."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

import affectkit
from affectkit.models.emotion_features import KIND, EmotionAugmentedFeatures, weights_digest
from affectkit.models.empathy_training import out_of_fold, ridge_head
from affectkit.models.base import run_head
from affectkit.models.regression import RegressionModel
from affectkit.text.sentences import mean_by_owner, split_sentences
from _support import numpy_rng


def test_split_sentences_keeps_order_and_owners():
    texts = ["It hurt. I cried!  Why? ok", "no boundary here", "?!", "A. B. Three words here."]
    sentences, owner = split_sentences(texts)
    assert sentences == ["It hurt.", "I cried!", "Why?", "no boundary here", "?!", "Three words here."]
    assert owner.tolist() == [0, 0, 0, 1, 2, 3]  # "ok", "A." and "B." are too short to stand alone


def test_mean_by_owner_matches_a_loop(gen):
    rng = numpy_rng(gen)
    owner = np.sort(np.concatenate([np.arange(5), rng.integers(0, 5, 17)]))
    rows = rng.standard_normal((len(owner), 3))
    expected = np.stack([rows[owner == i].mean(0) for i in range(5)])
    np.testing.assert_allclose(mean_by_owner(rows, owner, 5), expected, rtol=1e-12)


def _planted(rng, n=400, d=37):
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, d) + rng.uniform(-5, 5, d)  # unscaled columns
    w = rng.standard_normal((d, 2))
    y = (x - x.mean(0)) / x.std(0) @ w + 0.1 * rng.standard_normal((n, 2))
    return x.astype(np.float32), y


def test_ridge_head_predicts_what_sklearn_predicts(gen):
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    rng = numpy_rng(gen)
    x, y = _planted(rng)
    head, alphas = ridge_head(x, y)
    scaler = StandardScaler().fit(x.astype(np.float64))
    reference = RidgeCV(alphas=np.logspace(-1, 5, 25), alpha_per_target=True).fit(scaler.transform(x), y)
    got = run_head(head, x)
    np.testing.assert_allclose(got, reference.predict(scaler.transform(x)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(alphas, reference.alpha_)
    assert all(pearsonr(got[:, j], y[:, j])[0] > 0.99 for j in range(2))


def test_out_of_fold_predictions_never_see_their_own_targets(gen):
    rng = numpy_rng(gen)
    x, y = _planted(rng, n=120)
    folds = [(np.arange(40, 120), np.arange(40)), (np.arange(40), np.arange(40, 120))]
    pred = out_of_fold(x, y, folds)
    assert not np.isnan(pred).any()
    poisoned = y.copy()
    poisoned[:40] = 1e6  # the first fold's targets: its own predictions must not move
    again = out_of_fold(x, poisoned, folds)
    np.testing.assert_allclose(again[:40], pred[:40], rtol=1e-5)
    assert np.abs(again[40:] - pred[40:]).max() > 1.0  # the other fold trained on them


def test_features_refuse_emotion_weights_they_were_not_trained_on():
    features = EmotionAugmentedFeatures(emotion_model="text-emotion", digest="0" * 64)
    with pytest.raises(ValueError, match="emotion_model: this model was trained on the features of 'text-emotion'"):
        features(["I feel for them."])


def test_shipped_empathy_model_uses_the_shipped_emotion_weights():
    model = affectkit.load("empathy")
    assert isinstance(model, RegressionModel) and model.config["features"] == KIND
    assert model.config["emotion_model_sha256"] == weights_digest("text-emotion")
    texts = ["Those poor families lost everything in the flood. My heart breaks for them.",
             "The article describes a change in tax law. It takes effect next year."]
    x = model.features(texts)
    assert x.shape == (2, model.config["in_dim"])
    y = model.predict(texts)
    assert y[0, 0] > y[1, 0], "grief for flood victims reads as more empathic than a tax notice"


def test_unknown_feature_kind_is_refused():
    config = {"kind": "empathy", "targets": ["empathy", "distress"], "scale": [1, 7], "encoder": "x",
              "in_dim": 3, "out_dim": 2, "hidden": 0, "features": "mystery"}
    tensors = {"head.mean": torch.zeros(3), "head.std": torch.ones(3), "head.net.1.weight": torch.zeros(2, 3),
               "head.net.1.bias": torch.zeros(2), "target_mean": torch.zeros(2), "target_std": torch.ones(2)}
    with pytest.raises(ValueError, match="config: expected features 'shared' or 'emotion-augmented', got 'mystery'"):
        RegressionModel(tensors, config)


def test_training_writes_a_blended_model_that_loads(tmp_path, gen):
    """The whole recipe on a small copy (20 writers x 2 essays): folds by writer, the n-gram view
    in config, tensors and metrics, and the saved folder loads and predicts like the model."""
    import pandas as pd

    from affectkit.models.training import train

    rng = numpy_rng(gen)
    sad = ["It broke my heart to read about the flood.", "I feel so sad for those families.",
           "I cried when I saw the pictures of the children."]
    flat = ["The article lists the new rules.", "The report covers the budget numbers.", "It was a short update on traffic."]
    rows = []
    for w in range(20):
        for e in range(2):
            distressed = rng.random() < 0.5
            text = " ".join(rng.choice(sad if distressed else flat, 2)) + f" Note {w}-{e}."
            rows.append({"message_id": f"R_writer{w}_{e + 1}", "response_id": f"R_writer{w}", "article_id": 1,
                         "empathy": 5.0 + distressed + rng.normal(0, 0.3), "distress": 2.0 + 3 * distressed,
                         "empathy_bin": 1, "distress_bin": 1, "essay": text})
    corpus = tmp_path / "data" / "empathic_reactions"
    corpus.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(corpus / "messages_train.csv", index=False)
    model, metrics = train("empathy", tmp_path / "data", tmp_path / "out")
    assert model.config["char_ngrams"]["weight"] == pytest.approx(0.4) and metrics["writers"] == 20
    for key in ("cv_by_writer_distress_pearson_r", "cv_by_writer_char_ngrams_only_distress_pearson_r",
                "cv_by_writer_embeddings_only_distress_pearson_r", "cv_random_empathy_pearson_r"):
        assert np.isfinite(metrics[key]), key
    assert metrics["cv_by_writer_distress_pearson_r"] > 0.8, "distress is written all over these essays"
    again = affectkit.load(tmp_path / "out")
    texts = ["I feel so sad for those families. I cried.", "The report covers the budget numbers."]
    np.testing.assert_allclose(again.predict(texts), model.predict(texts), rtol=1e-5)
    assert again.predict(texts)[0, 1] > again.predict(texts)[1, 1]
