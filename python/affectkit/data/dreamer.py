"""DREAMER (Katsigiannis & Ramzan, 2018): 23 subjects x 18 clips, Emotiv EPOC (14 channels,
128 Hz), a 61 s baseline before each clip, self-assessed valence/arousal/dominance 1..5.

File: DREAMER.mat, a struct `DREAMER` with Data (one struct per subject: EEG.baseline and
EEG.stimuli as 18 cells of (samples, 14), ScoreValence/ScoreArousal/ScoreDominance),
EEG_SamplingRate and EEG_Electrodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from .eeg import EEGDataset, EEGTrial

CHANNELS = ("AF3", "F7", "F3", "FC5", "T7", "P7", "O1", "O2", "P8", "T8", "FC6", "F4", "F8", "AF4")
SFREQ = 128.0
SCORES = {"valence": "ScoreValence", "arousal": "ScoreArousal", "dominance": "ScoreDominance"}


def read(path) -> EEGDataset:
    """Read DREAMER.mat (a path to the file or to the folder holding it)."""
    file = Path(path)
    if file.is_dir():
        file = file / "DREAMER.mat"
    if not file.is_file():
        raise FileNotFoundError(f"DREAMER: no file at {str(file)!r}")
    try:
        mat = scipy.io.loadmat(file, simplify_cells=True)
    except Exception as err:  # scipy raises several types for non-MAT input
        raise ValueError(f"{file}: not a readable MATLAB file ({err})") from err

    def fail(what):
        raise ValueError(f"{file}: not DREAMER-shaped: {what}")

    root = mat.get("DREAMER")
    if not isinstance(root, dict) or not {"Data", "EEG_SamplingRate", "EEG_Electrodes"} <= set(root):
        fail("expected a struct 'DREAMER' with fields Data, EEG_SamplingRate, EEG_Electrodes")
    channels = tuple(str(c).strip() for c in np.atleast_1d(root["EEG_Electrodes"]))
    subjects = root["Data"] if isinstance(root["Data"], list) else [root["Data"]]
    trials = []
    for s, subj in enumerate(subjects, start=1):
        try:
            baselines, stimuli = subj["EEG"]["baseline"], subj["EEG"]["stimuli"]
            scores = {name: np.atleast_1d(subj[key]).astype(float) for name, key in SCORES.items()}
        except (KeyError, TypeError):
            fail(f"subject {s} lacks EEG.baseline, EEG.stimuli or the Score fields")
        if len(stimuli) != len(baselines) or any(len(v) != len(stimuli) for v in scores.values()):
            fail(f"subject {s} has {len(stimuli)} stimuli, {len(baselines)} baselines and "
                 f"{[len(v) for v in scores.values()]} scores")
        for k, (base, stim) in enumerate(zip(baselines, stimuli)):
            base, stim = np.asarray(base, dtype=np.float32), np.asarray(stim, dtype=np.float32)
            if stim.ndim != 2 or stim.shape[1] != len(channels) or base.ndim != 2 or base.shape[1] != len(channels):
                fail(f"subject {s} clip {k + 1}: expected (samples, {len(channels)}) arrays, "
                     f"got {stim.shape} and {base.shape}")
            trials.append(EEGTrial(str(s), k, stim.T.copy(), base.T.copy(),
                                   {name: float(v[k]) for name, v in scores.items()}))
    return EEGDataset("dreamer", float(root["EEG_SamplingRate"]), channels, trials, str(file))
