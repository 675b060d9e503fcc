"""Evaluation metrics (scikit-learn for classification, scipy for Pearson r)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import f1_score, mean_absolute_error

from .calibration import decide, expected_calibration_error


def emotion_metrics(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, ekman: np.ndarray | None = None,
                    labels=None) -> dict:
    """Macro/micro F1 over the labels, per-label F1, ECE; Ekman-level macro-F1 when `ekman`
    (labels x groups 0/1) is given."""
    y = np.asarray(y).astype(int)
    pred = decide(probs, thresholds)
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
        p_e = (pred.astype(int) @ ekman) > 0
        out["ekman_macro_f1"] = float(f1_score(y_e, p_e, average="macro", zero_division=0))
    return out


def regression_metrics(y: np.ndarray, pred: np.ndarray, targets) -> dict:
    out = {}
    for j, name in enumerate(targets):
        out[f"{name}_pearson_r"] = float(pearsonr(y[:, j], pred[:, j]).statistic)
        out[f"{name}_mae"] = float(mean_absolute_error(y[:, j], pred[:, j]))
    out["rows"] = int(len(y))
    return out
