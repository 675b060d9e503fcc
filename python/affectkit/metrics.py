"""Metrics for emotion recognition (computed with scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error


def weighted_f1(targets, predictions) -> float:
    return float(f1_score(targets, predictions, average="weighted", zero_division=0))


def weighted_f1_at_class_mix(targets, predictions, class_counts) -> float:
    """Weighted F1 that `predictions` would score on a set whose classes occur as `class_counts`
    (one count per class index 0..C-1), assuming only the mix changes (label shift: each class's
    examples look alike in both sets). Each example of class c weighs target share / own share,
    which moves precision, recall and the averaging weights to that mix. Used to read a dev
    score at a test split's published label counts, without its examples."""
    targets = np.asarray(targets)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class_counts: expected non-negative counts, one per class, not all zero; got {class_counts!r}")
    if targets.size == 0 or targets.min() < 0 or targets.max() >= len(counts):
        raise ValueError(f"targets: expected class indices in [0, {len(counts)}), got {targets.size} values"
                         + (f" in [{targets.min()}, {targets.max()}]" if targets.size else ""))
    own = np.bincount(targets, minlength=len(counts)).astype(np.float64)
    missing = (own == 0) & (counts > 0)
    if missing.any():
        raise ValueError(f"targets: classes {np.flatnonzero(missing).tolist()} have a count in class_counts but no "
                         "example here, so their share cannot be reweighted")
    ratio = np.divide(counts / counts.sum(), own / own.sum(), out=np.zeros_like(own), where=own > 0)
    return float(f1_score(targets, predictions, average="weighted", sample_weight=ratio[targets], zero_division=0))


def accuracy(targets, predictions) -> float:
    return float(accuracy_score(targets, predictions))


def seq2hr(probabilities, targets) -> float:
    """HiSTN's Sequential Top-2 Hit Rate for ordinal classes.

    The share of samples whose two most probable classes are neighbours on the ordinal scale
    (|top1 - top2| == 1) and include the true class.
    """
    p = np.asarray(probabilities)
    t = np.asarray(targets)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities: expected (n, classes >= 2), got shape {p.shape}")
    if t.shape != (p.shape[0],):
        raise ValueError(f"targets: expected shape ({p.shape[0]},), got {t.shape}")
    if len(t) == 0:
        raise ValueError("targets: expected at least one sample, got none")
    top2 = np.argsort(-p, axis=1, kind="stable")[:, :2]
    neighbours = np.abs(top2[:, 0] - top2[:, 1]) == 1
    contains = (top2 == t[:, None]).any(axis=1)
    return float(np.mean(neighbours & contains))


def per_subject(metric, subjects, *arrays) -> tuple[float, dict[str, float]]:
    """metric(*arrays restricted to each subject), and their unweighted mean over subjects."""
    subjects = np.asarray(subjects)
    scores = {}
    for s in np.unique(subjects):
        mask = subjects == s
        scores[str(s)] = metric(*(np.asarray(a)[mask] for a in arrays))
    return float(np.mean(list(scores.values()))), scores


def group_bootstrap(metric, groups, *arrays, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """metric(*arrays) on `resamples` resamples of whole groups (dialogues, subjects) drawn with
    replacement: the spread a score would show on another draw of groups of the same kind.
    Returns the resampled scores."""
    groups = np.asarray(groups)
    arrays = [np.asarray(a) for a in arrays]
    if any(len(a) != len(groups) for a in arrays):
        raise ValueError(f"arrays: expected {len(groups)} rows each (one per entry of groups), "
                         f"got {[len(a) for a in arrays]}")
    if resamples < 1:
        raise ValueError(f"resamples: expected a positive number, got {resamples}")
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(groups) else []
    if not members:
        raise ValueError("groups: expected at least one group, got none")
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for i in range(resamples):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        out[i] = metric(*(a[rows] for a in arrays))
    return out


def expected_calibration_error(probs, targets, bins: int = 15) -> float:
    """ECE over every (example, label) pair: sum over equal-width bins of |accuracy - confidence|
    weighted by the bin's share of pairs (the marginal ECE of multi-label classifiers)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=p, minlength=bins)
    hits = np.bincount(which, weights=y, minlength=bins)
    used = total > 0
    return float(np.sum(np.abs(hits[used] - conf[used])) / len(p))


def multilabel_metrics(y, pred, probs, ekman=None, labels=None) -> dict:
    """Macro/micro F1 of 0/1 decisions `pred`, per-label F1, ECE of `probs`; Ekman-level macro-F1
    when `ekman` (labels x groups 0/1) is given."""
    y = np.asarray(y).astype(int)
    per_label = f1_score(y, pred, average=None, zero_division=0)
    out = {
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "ece": expected_calibration_error(probs, y),
        "rows": int(len(y)),
    }
    if labels is not None:
        out["per_label_f1"] = {name: float(v) for name, v in zip(labels, per_label)}
    if ekman is not None:
        y_e = (y @ ekman) > 0
        p_e = (np.asarray(pred).astype(int) @ ekman) > 0
        out["ekman_macro_f1"] = float(f1_score(y_e, p_e, average="macro", zero_division=0))
    return out


def regression_metrics(y, pred, targets) -> dict:
    """Pearson r and mean absolute error per target column."""
    out = {}
    for j, name in enumerate(targets):
        out[f"{name}_pearson_r"] = float(pearsonr(y[:, j], pred[:, j]).statistic)
        out[f"{name}_mae"] = float(mean_absolute_error(y[:, j], pred[:, j]))
    out["rows"] = int(len(y))
    return out
