"""Metrics for emotion recognition (computed with scikit-learn where it has them)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def weighted_f1(targets, predictions) -> float:
    return float(f1_score(targets, predictions, average="weighted", zero_division=0))


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
