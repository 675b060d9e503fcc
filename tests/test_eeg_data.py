"""EEG readers, preprocessing, leakage-free splits and metrics, on files written in the real
formats with a planted class signal."""

import os
import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from affectkit.data import deap, dreamer, seed
from affectkit.data.eeg import from_arrays, from_mne
from affectkit.data.eeg_preprocessing import differential_entropy, histn_windows
from affectkit.evaluation import finetune_protocol, kfold_by_trial, leave_one_subject_out
from affectkit.metrics import accuracy, per_subject, seq2hr, weighted_f1

from eeg_files import write_deap, write_dreamer, write_seed
from _support import numpy_rng

# Bands that separate the planted rhythms (6, 11, 16, 21, 26 Hz).
TEST_BANDS = {f"b{f}": (f - 2.5, f + 2.5) for f in (6, 11, 16, 21, 26)}


@pytest.fixture(scope="module")
def dreamer_file(tmp_path_factory, module_gen):
    rng = numpy_rng(module_gen)
    path = tmp_path_factory.mktemp("dreamer") / "DREAMER.mat"
    scores = write_dreamer(path, rng)
    return path, scores


def test_dreamer_reader(dreamer_file):
    path, scores = dreamer_file
    ds = dreamer.read(path.parent)
    assert ds.channels == dreamer.CHANNELS and ds.sfreq == 128.0
    assert len(ds.trials) == 3 * 5 and ds.subjects == ["1", "2", "3"]
    t = ds.trials[6]  # subject 2, clip 2
    assert (t.subject, t.trial) == ("2", 1)
    assert t.signal.shape == (14, 62 * 128) and t.baseline.shape == (14, 61 * 128)
    assert t.targets == {"valence": float(scores[1][1]), "arousal": 3.0, "dominance": 2.0}


def test_histn_windows_follow_the_recipe(dreamer_file):
    ds = dreamer.read(dreamer_file[0])
    w = histn_windows(ds)
    assert w.x.shape == (15 * 60, 14, 128)
    assert np.all(np.bincount(w.start.astype(int)) == 15)  # 60 one-second windows per trial
    # Reference for one trial: last 60 s, z-scored by the middle 10 s of the baseline, / max|x|.
    t = ds.trials[4]
    base = t.baseline[:, (61 * 128 - 1280) // 2:][:, :1280].astype(np.float64)
    z = (t.signal[:, -60 * 128:] - base.mean(1, keepdims=True)) / base.std(1, keepdims=True)
    z /= np.abs(z).max()
    got = w.x[(w.subject == t.subject) & (w.trial == t.trial)]
    np.testing.assert_allclose(got.transpose(1, 0, 2).reshape(14, -1), z, rtol=1e-5, atol=1e-6)


def test_planted_signal_is_learnable_subject_independently(dreamer_file):
    ds = dreamer.read(dreamer_file[0])
    feats = differential_entropy(ds, bands=TEST_BANDS)
    assert feats.x.shape == (15 * 62, 14, 5)
    y = feats.targets["valence"].astype(int) - 1
    X = feats.x.reshape(len(feats), -1)
    preds = np.empty_like(y)
    for split in leave_one_subject_out(feats):
        clf = LogisticRegression(max_iter=2000).fit(X[split.train], y[split.train])
        preds[split.test] = clf.predict(X[split.test])
    mean_acc, by_subject = per_subject(accuracy, feats.subject, y, preds)
    assert set(by_subject) == {"1", "2", "3"}
    # Over 60 files (seeds 0-59): every subject 1.0; the shuffled control 0.16-0.26 (mean 0.198,
    # sd 0.021). Both bars are far off.
    assert mean_acc >= 0.9, f"5 classes, chance 0.2: got {mean_acc}"
    # The same pipeline on shuffled labels stays near chance: the model reads the signal.
    rng = np.random.default_rng(0)
    y_shuffled = rng.permutation(y)
    split = leave_one_subject_out(feats)[0]
    clf = LogisticRegression(max_iter=2000).fit(X[split.train], y_shuffled[split.train])
    assert accuracy(y_shuffled[split.test], clf.predict(X[split.test])) < 0.6


def test_splits_never_leak_trials(dreamer_file):
    w = histn_windows(dreamer.read(dreamer_file[0]))
    key = np.char.add(w.subject.astype(str), np.char.add(":", w.trial.astype(str)))
    kfold = kfold_by_trial(w, k=5, seed=1)
    assert len(kfold) == 3 * 5
    for s in kfold:
        assert not set(key[s.train]) & set(key[s.test])
        assert set(w.subject[s.train]) == set(w.subject[s.test]) == {s.subject}
    for s in leave_one_subject_out(w):
        assert set(w.subject[s.test]) == {s.subject} and s.subject not in set(w.subject[s.train])
        assert len(s.train) + len(s.test) == len(w)
    for s in finetune_protocol(w, finetune_seconds=10):
        assert (w.start[s.finetune] < 10).all() and (w.start[s.test] >= 10).all()
        assert len(s.finetune) == 5 * 10 and len(s.test) == 5 * 50
        assert set(w.subject[s.finetune]) == {s.subject}
    with pytest.raises(ValueError, match="k: subject 1 has 5 trials, fewer than 6 folds"):
        kfold_by_trial(w, k=6)


def test_deap_reader_and_safe_unpickling(tmp_path, gen):
    rng = numpy_rng(gen)
    write_deap(tmp_path, rng)
    ds = deap.read(tmp_path)
    assert len(ds.trials) == 8 and ds.channels == deap.CHANNELS
    assert ds.trials[0].signal.shape == (32, 8 * 128) and ds.trials[0].baseline.shape == (32, 3 * 128)
    assert set(ds.trials[0].targets) == {"valence", "arousal", "dominance", "liking"}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "s01.dat", "wb") as f:
        pickle.dump({"data": Evil(), "labels": None}, f)
    with pytest.raises(ValueError, match=r"s01.dat: not a DEAP preprocessed pickle \(refusing to load"):
        deap.read(tmp_path / "evil")


def test_seed_reader(tmp_path, gen):
    write_seed(tmp_path, numpy_rng(gen))
    ds = seed.read(tmp_path)
    assert ds.sfreq == 200.0 and len(ds.channels) == 62
    assert len(ds.trials) == 2 * 2 * 5
    assert [t.targets["label"] for t in ds.trials[:5]] == [1, 0, -1, 1, 0]
    assert {t.targets["session"] for t in ds.trials} == {1.0, 2.0}
    assert len({(t.subject, t.trial) for t in ds.trials}) == 20  # trial ids unique per subject


def test_bad_files_name_the_file_and_problem(tmp_path):
    bad = tmp_path / "DREAMER.mat"
    import scipy.io

    scipy.io.savemat(bad, {"something": np.zeros(3)})
    with pytest.raises(ValueError, match=r"DREAMER.mat: not DREAMER-shaped"):
        dreamer.read(bad)
    bad.write_bytes(b"definitely not a mat file")
    with pytest.raises(ValueError, match=r"DREAMER.mat: not a readable MATLAB file"):
        dreamer.read(bad)
    with pytest.raises(FileNotFoundError, match="DEAP: no sXX.dat files"):
        deap.read(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="SEED: no label file"):
        seed.read(tmp_path)


def test_signal_checks(gen):
    sig = numpy_rng(gen).standard_normal((2, 3, 256))
    ds = from_arrays(sig, 128, ["Fz", "Cz", "Pz"], targets=[{"y": 0}, {"y": 1}])
    with pytest.raises(ValueError, match=r"missing channel\(s\) \['O1'\]"):
        ds.select_channels(["Fz", "O1"])
    assert ds.select_channels(["Pz", "Fz"]).trials[1].signal[0, 5] == np.float32(sig[1, 2, 5])
    sig[1, 0, 7] = np.nan
    with pytest.raises(ValueError, match="subject 0 trial 1: signal contains NaN"):
        from_arrays(sig, 128, ["Fz", "Cz", "Pz"])
    with pytest.raises(ValueError, match=r"signal has shape \(3, 256\), expected \(2 channels"):
        from_arrays(np.zeros((1, 3, 256)), 128, ["Fz", "Cz"])
    with pytest.raises(ValueError, match="subjects: expected 2 entries"):
        from_arrays(np.zeros((2, 3, 256)), 128, ["Fz", "Cz", "Pz"], subjects=[1])
    short = from_arrays(np.zeros((1, 3, 100)), 128, ["Fz", "Cz", "Pz"], baselines=[np.ones((3, 2000))])
    with pytest.raises(ValueError, match="shorter than the 60 s kept"):
        histn_windows(short)
    with pytest.raises(ValueError, match="shorter than one 1 s window"):
        differential_entropy(short)


def test_from_mne(gen):
    import mne

    info = mne.create_info(["Fz", "Cz", "Pz", "EOG"], 128.0, ["eeg", "eeg", "eeg", "eog"])
    raw = mne.io.RawArray(numpy_rng(gen).standard_normal((4, 512)) * 1e-5, info, verbose=False)
    ds = from_mne(raw, targets=[{"valence": 3.0}])
    assert ds.channels == ("Fz", "Cz", "Pz") and ds.trials[0].signal.shape == (3, 512)


def test_seq2hr_and_f1():
    p = np.array([[0.5, 0.4, 0.1, 0, 0],   # top2 (0, 1): neighbours, true 1 -> hit
                  [0.5, 0.0, 0.4, 0, 0],   # top2 (0, 2): not neighbours -> miss
                  [0.0, 0.1, 0.2, 0.3, 0.4],  # top2 (4, 3): neighbours, true 2 -> miss
                  [0.0, 0.1, 0.2, 0.4, 0.3]])  # top2 (3, 4): true 3 -> hit
    assert seq2hr(p, np.array([1, 0, 2, 3])) == 0.5
    with pytest.raises(ValueError, match=r"targets: expected shape \(4,\)"):
        seq2hr(p, np.array([1, 2]))
    assert weighted_f1([0, 1, 1], [0, 1, 1]) == 1.0
