"""Neighbour blending, measured: does mixing the training neighbours' labels into a model's
prediction help on dev? p = (1 - a) * p_model + a * p_knn, with p_knn the mean label vector
(or mean gold score) of the k nearest training examples.

Honest protocol (as `models.training.cross_fitted_f1`): dev is split in two halves; on one
half, a and k (and, for text-emotion, the per-label thresholds) are chosen; the other half
is scored; then the halves swap and the two scores are averaged. a = 0 through the same
protocol is the model alone.

    python -m affectkit.retrieval.blending --data DIR [--model text-emotion|vad] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .corpus import model_training_index
from .text_index import TextIndex

ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
KS = (5, 10, 20, 40)


def blend(p_model: np.ndarray, p_knn: np.ndarray, alpha: float) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
    return (1.0 - alpha) * p_model + alpha * p_knn


def neighbour_means(values: np.ndarray, rows: np.ndarray, ks) -> dict[int, np.ndarray]:
    """For each k: the mean of `values` over the first k neighbour rows of every query."""
    if (rows < 0).any():
        raise ValueError("rows: every query needs max(ks) neighbours; the index is too small")
    return {k: values[rows[:, :k]].mean(axis=1) for k in ks}


def label_values(index: TextIndex, labels) -> np.ndarray:
    """The index's label matrix as float columns in `labels` order (zeros for absent labels)."""
    out = np.zeros((len(index), len(labels)), dtype=np.float64)
    for j, name in enumerate(labels):
        if name in index.label_names:
            out[:, j] = index.label_matrix[:, index.label_names.index(name)]
    return out


def _halves(n: int, seed: int, folds: int = 2):
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.zeros(n)))


def cross_fitted_blending(p_model, knn: dict, score, *, alphas=ALPHAS, seed: int = 0) -> dict:
    """score(p, fit_rows, eval_rows) -> float fits what it needs on fit_rows and scores eval_rows.

    Returns the 2-fold held-out score of the model alone (a = 0) and of the blend with (a, k)
    chosen on the fitting half, plus the choices."""
    base, blended, chosen = [], [], []
    for fit, held in _halves(len(p_model), seed):
        base.append(score(p_model, fit, held))
        best = max(((score(blend(p_model, q, a), fit, fit), a, k) for k, q in knn.items() for a in alphas),
                   key=lambda t: t[0])
        _, a, k = best
        blended.append(score(blend(p_model, knn[k], a), fit, held))
        chosen.append({"alpha": a, "k": k})
    return {"model_alone": float(np.mean(base)), "blended": float(np.mean(blended)), "chosen": chosen,
            "per_half": {"model_alone": base, "blended": blended}}


def measure_text_emotion(model, data, *, ks=KS, alphas=ALPHAS, seed: int = 0, threshold_grid=None) -> dict:
    """GoEmotions dev macro-F1 over the 28 labels, with and without neighbour blending
    (threshold_grid: candidate thresholds, default that of `choose_thresholds`)."""
    from sklearn.metrics import f1_score

    from ..data import goemotions
    from ..models.calibration import choose_thresholds, decide

    dev = goemotions.load(data, "dev")
    texts, y = list(dev["text"]), goemotions.multi_hot(dev["labels"])
    probs = model.predict_proba(texts)
    index = model_training_index(model, data)
    _, rows = index.search_vectors(model.features.encoder.encode(texts), max(ks))
    knn = neighbour_means(label_values(index, model.labels), rows, ks)

    def macro_f1(p, fit, rows_):
        th = choose_thresholds(p[fit], y[fit], threshold_grid)
        return f1_score(y[rows_], decide(p[rows_], th), average="macro", zero_division=0)

    out = cross_fitted_blending(probs, knn, macro_f1, alphas=alphas, seed=seed)
    return {"model": "text-emotion", "metric": "macro_f1 (28 labels, GoEmotions dev, 2-fold cross-fitted)",
            "dev_rows": len(texts), "ks": list(ks), "alphas": list(alphas), **out}


def measure_vad(model, data, *, ks=KS, alphas=ALPHAS, seed: int = 0) -> dict:
    """EmoBank dev Pearson r per dimension, with and without neighbour blending (a, k per dimension)."""
    from scipy.stats import pearsonr

    from ..data import emobank

    dev = emobank.load(data, "dev")
    texts = list(dev["text"])
    y = dev[list(emobank.DIMENSIONS)].to_numpy(np.float64)
    pred = model.predict(texts)
    index = model_training_index(model, data)
    _, rows = index.search_vectors(model.features.encoder.encode(texts), max(ks))
    knn = neighbour_means(index.scores.astype(np.float64), rows, ks)
    result = {"model": "vad", "metric": "Pearson r (EmoBank dev, 2-fold cross-fitted)", "dev_rows": len(texts),
              "ks": list(ks), "alphas": list(alphas), "dimensions": {}}
    for j, name in enumerate(emobank.DIMENSIONS):
        def r(p, fit, rows_, j=j):  # nothing to fit beyond (a, k)
            return pearsonr(p[rows_, j], y[rows_, j])[0]

        result["dimensions"][name] = cross_fitted_blending(pred, knn, r, alphas=alphas, seed=seed)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m affectkit.retrieval.blending", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="corpus folder (default: $AFFECTKIT_DATA)")
    parser.add_argument("--model", choices=("text-emotion", "vad"), default="text-emotion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ..models import load

    model = load(args.model)
    measure = measure_text_emotion if args.model == "text-emotion" else measure_vad
    print(json.dumps(measure(model, args.data, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
