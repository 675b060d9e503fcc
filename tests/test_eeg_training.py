"""The EEG training driver on small files in the real formats with a planted class signal."""

import json

import numpy as np
import pytest

from affectkit import eeg_training
from affectkit.data import dreamer, seed

from eeg_files import write_dreamer, write_seed


@pytest.fixture(scope="module")
def dreamer_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("dreamer") / "DREAMER.mat"
    write_dreamer(path, np.random.default_rng(0), subjects=3, clips=5, stim_seconds=12.0, base_seconds=11.0)
    return dreamer.read(path)


def test_histn_loso_learns_and_shuffled_control_does_not(dreamer_set):
    res = eeg_training.run(dreamer_set, "histn", "valence", "loso", epochs=40, lr=1e-2, batch_size=32, progress=False)
    json.dumps(res)  # JSON-able
    assert res["classes"] == 5 and res["splits"] == 3 and set(res["per_subject"]) == {"1", "2", "3"}
    assert res["parameters"] == 1181
    assert res["mean"]["accuracy"] > 0.6, res["mean"]  # chance is 0.2
    assert res["mean"]["weighted_f1"] > 0.5 and 0 <= res["mean"]["seq2hr"] <= 1
    ctrl = eeg_training.run(dreamer_set, "histn", "valence", "loso", epochs=40, lr=1e-2, batch_size=32,
                            shuffle_labels=True, progress=False)
    assert ctrl["mean"]["accuracy"] < 0.4, ctrl["mean"]


def test_kfold_and_finetune_protocols_run(dreamer_set):
    res = eeg_training.run(dreamer_set, "histn", "valence", "kfold", epochs=1, folds=5, progress=False)
    assert res["splits"] == 15 and sum(v["windows"] for v in res["per_subject"].values()) == res["windows"]
    res = eeg_training.run(dreamer_set, "dgcnn", "valence", "finetune", epochs=1, progress=False)
    # DE windows cover the whole 12 s clip: fine-tuning on the first 10 s leaves 2 windows per clip
    assert res["per_subject"]["1"]["windows"] == 5 * (12 - 10)


def test_dgcnn_on_seed(tmp_path):
    write_seed(tmp_path, np.random.default_rng(1), subjects=2, sessions=1, seconds=6.0)
    res = eeg_training.run(seed.read(tmp_path), "dgcnn", "valence", "loso", epochs=30, lr=1e-2, batch_size=16,
                           progress=False)
    assert res["classes"] == 3 and res["target"] is None
    assert res["mean"]["accuracy"] > 0.7, res["mean"]  # theta / alpha / beta rhythms; chance is 0.4


def test_bad_arguments(dreamer_set):
    with pytest.raises(ValueError, match="protocol"):
        eeg_training.run(dreamer_set, "histn", "valence", "holdout")
    with pytest.raises(ValueError, match="model"):
        eeg_training.run(dreamer_set, "eegnet", "valence", "loso")
    with pytest.raises(ValueError, match="target"):
        eeg_training.run(dreamer_set, "histn", "liking", "loso")


@pytest.mark.parametrize("model", ["histn", "dgcnn"])
def test_deap_binary_targets(tmp_path, model):
    from affectkit.data import deap

    from eeg_files import write_deap

    write_deap(tmp_path, np.random.default_rng(2), subjects=2, trials=4, seconds=4.0)
    res = eeg_training.run(deap.read(tmp_path), model, "valence", "loso", epochs=2, progress=False)
    assert res["classes"] == 2 and "seq2hr" not in res["mean"] and set(res["per_subject"]) == {"1", "2"}
    json.dumps(res)
