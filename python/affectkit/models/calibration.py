"""Temperature scaling and per-label decision thresholds for multi-label sigmoid outputs
(the calibration error itself is affectkit.metrics.expected_calibration_error)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import f1_score, log_loss


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 minimising binary cross-entropy of sigmoid(logits / T) against 0/1 targets."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    targets = np.asarray(targets, dtype=np.float64).ravel()
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets: expected equal shapes, got {logits.shape} and {targets.shape}")

    def loss(log_t: float) -> float:
        p = np.clip(expit(logits / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return log_loss(targets, p, labels=[0, 1])

    res = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, grid=None) -> np.ndarray:
    """Per label, the threshold on `probs` maximising that label's F1 on (probs, targets)."""
    probs = np.asarray(probs)
    targets = np.asarray(targets).astype(int)
    grid = np.linspace(0.02, 0.9, 45) if grid is None else np.asarray(grid)
    out = np.empty(probs.shape[1], dtype=np.float32)
    for j in range(probs.shape[1]):
        scores = [f1_score(targets[:, j], probs[:, j] >= t, zero_division=0) for t in grid]
        out[j] = grid[int(np.argmax(scores))]
    return out


def decide(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 decisions; a row with nothing over its threshold gets its most probable label, so
    every text receives at least one emotion (GoEmotions has no empty label sets)."""
    pred = probs >= thresholds[None, :]
    empty = ~pred.any(axis=1)
    pred[empty, np.argmax(probs[empty], axis=1)] = True
    return pred
