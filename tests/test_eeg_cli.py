"""`affectkit train eeg` end to end on tiny DREAMER-format files, and its bad-input errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.io

from eeg_files import write_dreamer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "affectkit", "train", "eeg", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dreamer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dreamer") / "DREAMER.mat"
    write_dreamer(path, np.random.default_rng(3), subjects=2, clips=5, stim_seconds=11.0, base_seconds=11.0)
    return path


def test_train_eeg_json(dreamer_file, tmp_path):
    out = tmp_path / "res.json"
    r = _cli("--dataset", "dreamer", "--data", dreamer_file, "--model", "histn", "--target", "valence",
             "--protocol", "loso", "--epochs", "1", "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res == json.loads(out.read_text())
    assert res["model"] == "histn" and res["protocol"] == "loso" and set(res["per_subject"]) == {"1", "2"}
    assert {"weighted_f1", "accuracy", "seq2hr"} == set(res["mean"])
    r = _cli("--dataset", "dreamer", "--data", dreamer_file, "--model", "dgcnn", "--protocol", "kfold", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "mean" in r.stdout and "weighted_f1" in r.stdout


def _bad_dreamer(path, change):
    mat = scipy.io.loadmat(path, simplify_cells=False)
    change(mat["DREAMER"][0, 0])
    scipy.io.savemat(path, {"DREAMER": mat["DREAMER"]})


def test_bad_input(dreamer_file, tmp_path, capsys):
    from affectkit.cli import main

    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"X": np.zeros((3, 3))})
    nan, missing, short = tmp_path / "nan.mat", tmp_path / "missing.mat", tmp_path / "short.mat"
    write_dreamer(nan, np.random.default_rng(0), subjects=2, clips=2, stim_seconds=11.0, base_seconds=11.0)
    _bad_dreamer(nan, lambda root: root["Data"][0, 0]["EEG"][0, 0]["stimuli"][0, 0][1, 0].__setitem__((5, 3), np.nan))
    write_dreamer(missing, np.random.default_rng(0), subjects=2, clips=2, stim_seconds=11.0, base_seconds=11.0)
    _bad_dreamer(missing, lambda root: root["EEG_Electrodes"][0].__setitem__(3, np.array(["XX"])))
    write_dreamer(short, np.random.default_rng(0), subjects=2, clips=2, stim_seconds=0.5, base_seconds=11.0)
    text = tmp_path / "notes.mat"
    text.write_text("not a MAT file")
    cases = [(other, "not DREAMER-shaped"), (nan, "NaN"), (missing, "missing channel"), (short, "shorter"),
             (text, "not a readable MATLAB file"), (tmp_path / "absent.mat", "no file")]
    r = _cli("--dataset", "dreamer", "--data", other, "--epochs", "1")  # one through the real entry point
    assert r.returncode == 2 and "not DREAMER-shaped" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for path, message in cases:  # the rest in-process (fast)
        code = main(["train", "eeg", "--dataset", "dreamer", "--data", str(path), "--epochs", "1"])
        err = capsys.readouterr().err
        assert code == 2, (path, err)
        assert message in err and path.name in err, (path, err)
