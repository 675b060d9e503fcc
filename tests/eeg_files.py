"""Small EEG corpora written in the real file formats, with a planted class signal.

The class of a trial sets the frequency of a rhythm added to noise (6 + 5 * class Hz), so a
band-power model must really read the signal to beat chance, whatever the amplitude scaling.
"""

from __future__ import annotations

import pickle

import numpy as np
import scipy.io

from affectkit.data import deap, dreamer, seed


def planted(rng, label: int, channels: int, samples: int, sfreq: float) -> np.ndarray:
    t = np.arange(samples) / sfreq
    rhythm = np.sin(2 * np.pi * (6 + 5 * label) * t + rng.uniform(0, 2 * np.pi, (channels, 1)))
    return (2.0 * rhythm + rng.standard_normal((channels, samples))).astype(np.float64)


def _cell(items) -> np.ndarray:
    cell = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        cell[i, 0] = item
    return cell


def write_dreamer(path, rng, subjects=3, clips=5, stim_seconds=62.0, base_seconds=61.0):
    """DREAMER.mat with its nested layout; returns the valence scores per subject (1..5)."""
    sf = dreamer.SFREQ
    data = np.empty((1, subjects), dtype=object)
    scores = []
    for s in range(subjects):
        valence = rng.permutation(np.arange(clips) % 5 + 1)  # every score, in a random order
        stim = [planted(rng, int(v) - 1, 14, int(stim_seconds * sf), sf).T for v in valence]
        base = [rng.standard_normal((int(base_seconds * sf), 14)) * 3 + 1 for _ in valence]
        data[0, s] = {
            "Age": 25, "Gender": "male",
            "EEG": {"baseline": _cell(base), "stimuli": _cell(stim)},
            "ECG": {"baseline": _cell([np.zeros((2, 2))] * clips), "stimuli": _cell([np.zeros((2, 2))] * clips)},
            "ScoreValence": valence[:, None].astype(float),
            "ScoreArousal": np.full((clips, 1), 3.0),
            "ScoreDominance": np.full((clips, 1), 2.0),
        }  # fmt: skip
        scores.append(valence)
    electrodes = np.empty((1, 14), dtype=object)
    electrodes[0, :] = list(dreamer.CHANNELS)
    root = {"Data": data, "EEG_SamplingRate": sf, "ECG_SamplingRate": 256.0, "EEG_Electrodes": electrodes,
            "noOfSubjects": float(subjects), "noOfVideoSequences": float(clips)}
    scipy.io.savemat(path, {"DREAMER": root})
    return scores


def write_deap(folder, rng, subjects=2, trials=4, seconds=8.0):
    """sXX.dat pickles (data (trials, 40, samples), labels (trials, 4)); valence > 5 is class 1."""
    sf, base = deap.SFREQ, int(deap.BASELINE_SECONDS * deap.SFREQ)
    for s in range(1, subjects + 1):
        labels = np.column_stack([rng.choice([2.0, 8.0], trials), rng.uniform(1, 9, (trials, 3))])
        data = np.stack([
            np.concatenate([rng.standard_normal((40, base)),
                            planted(rng, int(v > 5), 40, int(seconds * sf), sf)], axis=1)
            for v in labels[:, 0]
        ])  # fmt: skip
        with open(folder / f"s{s:02d}.dat", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)


def write_seed(folder, rng, subjects=2, sessions=2, seconds=5.0, labels=(1, 0, -1, 1, 0)):
    sf = seed.SFREQ
    scipy.io.savemat(folder / "label.mat", {"label": np.array([labels])})
    for s in range(1, subjects + 1):
        for d in range(sessions):
            clips = {f"ab_eeg{k + 1}": planted(rng, lab + 1, 62, int(seconds * sf), sf) for k, lab in enumerate(labels)}
            scipy.io.savemat(folder / f"{s}_2013100{d + 1}.mat", clips)
