"""SEED (Zheng & Lu, 2015), Preprocessed_EEG release: 15 subjects x 3 sessions, one .mat per
session named `<subject>_<date>.mat` holding 15 clips `<initials>_eeg1..15` of (62, samples)
at 200 Hz, and `label.mat` with the clips' labels (-1 negative, 0 neutral, 1 positive).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.io

from .eeg import EEGDataset, EEGTrial

CHANNELS = (
    "FP1", "FPZ", "FP2", "AF3", "AF4", "F7", "F5", "F3", "F1", "FZ", "F2", "F4", "F6", "F8",
    "FT7", "FC5", "FC3", "FC1", "FCZ", "FC2", "FC4", "FC6", "FT8", "T7", "C5", "C3", "C1", "CZ",
    "C2", "C4", "C6", "T8", "TP7", "CP5", "CP3", "CP1", "CPZ", "CP2", "CP4", "CP6", "TP8", "P7",
    "P5", "P3", "P1", "PZ", "P2", "P4", "P6", "P8", "PO7", "PO5", "PO3", "POZ", "PO4", "PO6",
    "PO8", "CB1", "O1", "OZ", "O2", "CB2",
)  # fmt: skip
SFREQ = 200.0
_CLIP_KEY = re.compile(r"_eeg(\d+)$")
_FILE_NAME = re.compile(r"^(\d+)_(\d+)$")


def _load(file: Path) -> dict:
    try:
        return scipy.io.loadmat(file)
    except Exception as err:
        raise ValueError(f"{file}: not a readable MATLAB file ({err})") from err


def read(folder, label_file=None) -> EEGDataset:
    """Read every `<subject>_<date>.mat` in `folder`; labels from label.mat beside them."""
    folder = Path(folder)
    label_file = Path(label_file) if label_file else folder / "label.mat"
    if not label_file.is_file():
        raise FileNotFoundError(f"SEED: no label file at {str(label_file)!r}")
    labels = _load(label_file).get("label")
    if labels is None:
        raise ValueError(f"{label_file}: not SEED-shaped: expected a variable 'label'")
    labels = np.asarray(labels).ravel().astype(int)
    if not set(labels) <= {-1, 0, 1}:
        raise ValueError(f"{label_file}: labels must be -1, 0 or 1, got {sorted(set(labels))}")

    sessions = defaultdict(list)
    for file in folder.glob("*.mat"):
        m = _FILE_NAME.match(file.stem)
        if m:
            sessions[int(m.group(1))].append((m.group(2), file))
    if not sessions:
        raise FileNotFoundError(f"SEED: no <subject>_<date>.mat files in {str(folder)!r}")

    trials = []
    for subject in sorted(sessions):
        for session, (_, file) in enumerate(sorted(sessions[subject]), start=1):
            mat = _load(file)
            clips = {int(_CLIP_KEY.search(k).group(1)): v for k, v in mat.items() if _CLIP_KEY.search(k)}
            if sorted(clips) != list(range(1, len(labels) + 1)):
                raise ValueError(f"{file}: not SEED-shaped: expected clips _eeg1.._eeg{len(labels)}, got {sorted(clips)}")
            for k in range(1, len(labels) + 1):
                x = np.asarray(clips[k], dtype=np.float32)
                if x.ndim != 2 or x.shape[0] != len(CHANNELS):
                    raise ValueError(f"{file}: clip {k} has shape {x.shape}, expected ({len(CHANNELS)}, samples)")
                trials.append(EEGTrial(str(subject), (session - 1) * len(labels) + k - 1, x,
                                       None, {"label": float(labels[k - 1]), "session": float(session)}))
    return EEGDataset("seed", SFREQ, CHANNELS, trials, str(folder))
