"""DEAP (Koelstra et al., 2012), preprocessed Python release: one pickle per subject
(s01.dat .. s32.dat) holding data (40 trials, 40 channels, 8064 samples at 128 Hz, the first
3 s a baseline) and labels (40, 4: valence, arousal, dominance, liking on 1..9).
The first 32 channels are EEG, in the Geneva order below.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from .eeg import EEGDataset, EEGTrial

CHANNELS = (
    "Fp1", "AF3", "F3", "F7", "FC5", "FC1", "C3", "T7", "CP5", "CP1", "P3", "P7", "PO3", "O1", "Oz", "Pz",
    "Fp2", "AF4", "Fz", "F4", "F8", "FC6", "FC2", "Cz", "C4", "T8", "CP6", "CP2", "P4", "P8", "PO4", "O2",
)  # fmt: skip
SFREQ = 128.0
BASELINE_SECONDS = 3.0
TARGETS = ("valence", "arousal", "dominance", "liking")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a .dat file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # protocol-2 bytes
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_subject(file) -> tuple[np.ndarray, np.ndarray]:
    """(data (trials, channels, samples), labels (trials, 4)) of one sXX.dat file."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{file}: not a DEAP preprocessed pickle ({err})") from err
    if not isinstance(obj, dict) or "data" not in obj or "labels" not in obj:
        raise ValueError(f"{file}: not DEAP-shaped: expected a dict with 'data' and 'labels'")
    data, labels = np.asarray(obj["data"]), np.asarray(obj["labels"])
    if data.ndim != 3 or data.shape[1] < len(CHANNELS) or labels.shape != (data.shape[0], len(TARGETS)):
        raise ValueError(f"{file}: not DEAP-shaped: data {data.shape}, labels {labels.shape}; expected "
                         f"(trials, >=32 channels, samples) and (trials, 4)")
    return data, labels


def read(path) -> EEGDataset:
    """Read every sXX.dat in a folder (or one file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("s[0-9][0-9].dat"))
    if not files:
        raise FileNotFoundError(f"DEAP: no sXX.dat files at {str(path)!r}")
    base = int(BASELINE_SECONDS * SFREQ)
    trials = []
    for file in files:
        data, labels = read_subject(file)
        if data.shape[2] <= base:
            raise ValueError(f"{file}: trials of {data.shape[2]} samples are no longer than the 3 s baseline")
        match = re.search(r"(\d+)", file.stem)
        subject = str(int(match.group(1))) if match else file.stem
        eeg = data[:, : len(CHANNELS)].astype(np.float32)
        for k in range(data.shape[0]):
            trials.append(EEGTrial(subject, k, eeg[k, :, base:].copy(), eeg[k, :, :base].copy(),
                                   dict(zip(TARGETS, map(float, labels[k])))))
    return EEGDataset("deap", SFREQ, CHANNELS, trials, str(path))
