"""Weighted F1 at another class mix, and the group bootstrap, against answers known by
construction (duplicated rows, whole groups)."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from affectkit.metrics import group_bootstrap, weighted_f1, weighted_f1_at_class_mix
from _support import numpy_rng


def _labels(rng, n, classes):
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])  # every class present
    noisy = np.where(rng.random(n) < 0.4, rng.integers(0, classes, n), y)  # a classifier 60 % right
    return y, noisy


def test_at_its_own_mix_it_is_plain_weighted_f1(gen):
    rng = numpy_rng(gen)
    y, pred = _labels(rng, 211, 5)
    own = np.bincount(y, minlength=5)
    assert weighted_f1_at_class_mix(y, pred, own * 3) == pytest.approx(weighted_f1(y, pred), abs=1e-12)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_reweighting_equals_duplicating_the_rows_of_a_class(gen, classes):
    # Target counts that are integer multiples of each class's own count are the same set with
    # those rows repeated: precision, recall and the averaging weights all move.
    rng = numpy_rng(gen)
    y, pred = _labels(rng, 97, classes)
    own = np.bincount(y, minlength=classes)
    copies = rng.integers(1, 5, classes)
    copies[rng.integers(0, classes)] = 4  # at least one class changes its share
    rows = np.concatenate([np.repeat(np.flatnonzero(y == c), copies[c]) for c in range(classes)])
    expected = f1_score(y[rows], pred[rows], average="weighted")
    assert weighted_f1_at_class_mix(y, pred, own * copies) == pytest.approx(expected, abs=1e-12)


def test_a_class_left_out_of_the_mix_drops_out_of_the_score(gen):
    rng = numpy_rng(gen)
    y, pred = _labels(rng, 120, 3)
    counts = np.bincount(y, minlength=3).astype(float)
    counts[2] = 0
    keep = y != 2
    # Its rows weigh nothing, but predictions of class 2 still cost the other classes recall.
    expected = f1_score(y[keep], pred[keep], average="weighted", labels=[0, 1])
    assert weighted_f1_at_class_mix(y, pred, counts) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("counts, targets, match", [
    ([3, -1], [0, 1], "class_counts: expected non-negative"),
    ([0, 0], [0, 1], "class_counts: expected non-negative"),
    ([], [0], "class_counts"),
    ([1, 1], [0, 2], r"targets: expected class indices in \[0, 2\)"),
    ([1, 1], [], r"targets: expected class indices"),
    ([1, 1, 1], [0, 1, 1], r"classes \[2\] have a count"),
])
def test_bad_class_mix_input(counts, targets, match):
    with pytest.raises(ValueError, match=match):
        weighted_f1_at_class_mix(targets, targets, counts)


def test_group_bootstrap_draws_whole_groups(gen):
    rng = numpy_rng(gen)
    sizes = rng.integers(1, 6, 13)
    groups = np.repeat(rng.permutation(1000)[:13], sizes)  # group names in any order, not 0..G-1
    rng.shuffle(groups)  # members need not be adjacent
    size_of = dict(zip(*np.unique(groups, return_counts=True)))

    def whole(g):
        names, counts = np.unique(g, return_counts=True)
        return float(all(c % size_of[n] == 0 for n, c in zip(names, counts)))

    draws = group_bootstrap(whole, groups, groups, resamples=200, seed=int(rng.integers(1 << 30)))
    assert draws.shape == (200,) and (draws == 1).all()
    # Resampling varies which groups come back: the number of distinct groups is not constant.
    distinct = group_bootstrap(lambda g: len(np.unique(g)), groups, groups, resamples=200, seed=1)
    assert distinct.min() < 13 and distinct.max() <= 13 and distinct.std() > 0


def test_group_bootstrap_of_one_group_repeats_the_score_and_replays_by_seed(gen):
    rng = numpy_rng(gen)
    y, pred = _labels(rng, 50, 3)
    one = group_bootstrap(weighted_f1, np.zeros(50), y, pred, resamples=5)
    np.testing.assert_allclose(one, weighted_f1(y, pred))
    groups = rng.integers(0, 9, 50)
    a = group_bootstrap(weighted_f1, groups, y, pred, resamples=30, seed=7)
    b = group_bootstrap(weighted_f1, groups, y, pred, resamples=30, seed=7)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=[0, 1], arrays=([1, 2, 3],)), "arrays: expected 2 rows each"),
    (dict(groups=[], arrays=([],)), "groups: expected at least one group"),
    (dict(groups=[0], arrays=([1],), resamples=0), "resamples: expected a positive number"),
])
def test_bad_bootstrap_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_bootstrap(len, kwargs["groups"], *kwargs["arrays"], resamples=kwargs.get("resamples", 3))
