"""Containers for EEG emotion corpora: trials of multichannel signal with their ratings.

Every reader (DREAMER, DEAP, SEED, plain arrays, MNE objects) returns an `EEGDataset`, so
preprocessing, splitting and models never depend on a corpus's file layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EEGTrial:
    subject: str
    trial: int
    signal: np.ndarray  # (channels, samples) float32, the stimulus part
    baseline: np.ndarray | None = None  # (channels, samples) resting signal before it, if any
    targets: dict[str, float] = field(default_factory=dict)  # e.g. valence/arousal/dominance or label


@dataclass
class EEGDataset:
    name: str
    sfreq: float
    channels: tuple[str, ...]
    trials: list[EEGTrial]
    source: str = ""  # file or folder it was read from, for error messages

    def __post_init__(self):
        where = f"{self.source}: " if self.source else ""
        if self.sfreq <= 0:
            raise ValueError(f"{where}sfreq: expected a positive sampling rate, got {self.sfreq}")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"{where}channels: duplicate channel names in {list(self.channels)}")
        for t in self.trials:
            for part, arr in (("signal", t.signal), ("baseline", t.baseline)):
                if arr is None:
                    continue
                if arr.ndim != 2 or arr.shape[0] != len(self.channels):
                    raise ValueError(
                        f"{where}subject {t.subject} trial {t.trial}: {part} has shape {arr.shape}, "
                        f"expected ({len(self.channels)} channels, samples)"
                    )
                if not np.isfinite(arr).all():
                    raise ValueError(f"{where}subject {t.subject} trial {t.trial}: {part} contains NaN or inf")

    @property
    def subjects(self) -> list[str]:
        return sorted({t.subject for t in self.trials}, key=_natural_key)

    def select_channels(self, names) -> "EEGDataset":
        """The same trials restricted to (and reordered as) `names`."""
        missing = [n for n in names if n not in self.channels]
        if missing:
            raise ValueError(f"{self.source or self.name}: missing channel(s) {missing}; has {list(self.channels)}")
        idx = [self.channels.index(n) for n in names]
        trials = [
            EEGTrial(t.subject, t.trial, t.signal[idx], None if t.baseline is None else t.baseline[idx], dict(t.targets))
            for t in self.trials
        ]
        return EEGDataset(self.name, self.sfreq, tuple(names), trials, self.source)


def _natural_key(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def from_arrays(signals, sfreq: float, channels, targets=None, subjects=None, baselines=None, name="arrays") -> EEGDataset:
    """Trials from plain arrays: `signals` is (trials, channels, samples) or a list of (channels, samples)."""
    signals = list(signals)
    n = len(signals)
    subjects = ["0"] * n if subjects is None else [str(s) for s in subjects]
    targets = [{} for _ in range(n)] if targets is None else [dict(t) for t in targets]
    baselines = [None] * n if baselines is None else list(baselines)
    for arg, values in (("subjects", subjects), ("targets", targets), ("baselines", baselines)):
        if len(values) != n:
            raise ValueError(f"{arg}: expected {n} entries (one per trial), got {len(values)}")
    trials = [
        EEGTrial(s, i, np.asarray(x, dtype=np.float32), None if b is None else np.asarray(b, dtype=np.float32), t)
        for i, (x, s, t, b) in enumerate(zip(signals, subjects, targets, baselines))
    ]
    return EEGDataset(name, float(sfreq), tuple(channels), trials)


def from_mne(inst, targets=None, subject: str = "0") -> EEGDataset:
    """Trials from an MNE `Raw` (one trial) or `Epochs` (one trial per epoch), EEG channels only."""
    import mne

    picks = mne.pick_types(inst.info, eeg=True, exclude="bads")
    channels = tuple(inst.ch_names[i] for i in picks)
    if isinstance(inst, mne.BaseEpochs):
        data = inst.get_data(picks=picks)
    elif isinstance(inst, mne.io.BaseRaw):
        data = inst.get_data(picks=picks)[None]
    else:
        raise TypeError(f"inst: expected mne Raw or Epochs, got {type(inst).__name__}")
    return from_arrays(data, inst.info["sfreq"], channels, targets=targets, subjects=[subject] * len(data), name="mne")
