"""Temperature, thresholds, ECE, decisions, hold-out split and head fitting on synthetic data
where the right answer is known."""

import numpy as np
import pytest
import torch

from affectkit.metrics import expected_calibration_error
from affectkit.models.calibration import choose_thresholds, decide, fit_temperature
from affectkit.models.training import fit_head, holdout_mask
from _support import numpy_rng


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(gen, true_t):
    rng = numpy_rng(gen)
    logits = rng.normal(0, 3, size=(20_000, 4))
    y = rng.random(logits.shape) < 1 / (1 + np.exp(-logits / true_t))
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.1)


def test_fit_temperature_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        fit_temperature(np.zeros((3, 2)), np.zeros((2, 2)))


def test_ece_known_values(gen):
    rng = numpy_rng(gen)
    assert expected_calibration_error(np.ones(10), np.r_[np.ones(5), np.zeros(5)]) == pytest.approx(0.5)
    assert expected_calibration_error(np.zeros(4), np.zeros(4)) == 0.0
    p = rng.random(200_000)
    calibrated = rng.random(p.shape) < p
    assert expected_calibration_error(p, calibrated) < 0.01
    assert expected_calibration_error(p ** 3, calibrated) > 0.1


def test_choose_thresholds_finds_separating_cut(gen):
    rng = numpy_rng(gen)
    cuts = np.array([0.2, 0.5, 0.7])
    probs = rng.random((500, 3))
    y = probs > cuts  # each label is exactly "probability above its cut"
    th = choose_thresholds(probs, y, grid=np.linspace(0.05, 0.95, 91))
    assert np.allclose(th, cuts, atol=0.02)
    from sklearn.metrics import f1_score

    assert f1_score(y, probs >= th, average="macro") > 0.97


def test_decide_gives_every_row_a_label():
    probs = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    out = decide(probs, np.array([0.5, 0.5, 0.5]))
    assert out.tolist() == [[True, True, False], [False, False, True], [True, False, False]]


def test_holdout_mask_is_fixed_and_about_a_fifth():
    ids = np.arange(5000)
    m = holdout_mask(ids)
    assert 0.17 < m.mean() < 0.23
    assert np.array_equal(m[::-1], holdout_mask(ids[::-1])), "membership depends on the id, not the order"


def test_fit_head_learns_a_linear_target(gen):
    rng = numpy_rng(gen)
    w = rng.normal(size=(6, 2))
    x = rng.normal(size=(1200, 6)).astype(np.float32)
    y = x @ w + 0.05 * rng.normal(size=(1200, 2))
    head, info = fit_head(x[:1000], y[:1000], x[1000:], y[1000:], loss="mse", hidden=32, dropout=0.0, lr=1e-2,
                          weight_decay=0.0, epochs=60, batch=64, patience=10)
    with torch.no_grad():
        pred = head(torch.from_numpy(x[1000:])).numpy()
    assert np.corrcoef(pred[:, 0], y[1000:, 0])[0, 1] > 0.95
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 60


def test_fit_head_refuses_non_finite_targets():
    x = np.ones((8, 3), dtype=np.float32)
    y = np.full((8, 1), np.nan)
    with pytest.raises(ValueError, match="dev loss was never finite"):
        fit_head(x, y, x, y, loss="mse", hidden=0, dropout=0.0, lr=1e-2, weight_decay=0.0, epochs=2, batch=4,
                 patience=1)
