"""EEG preprocessing as the papers do it, as composable steps from EEGDataset to windows.

- `histn_windows`: HiSTN's recipe (Kuang et al., 2024): the last 60 s of each clip, z-scored
  per channel with the mean and deviation of the middle 10 s of its baseline, scaled by the
  trial's max |x|, cut into 1 s windows.
- `differential_entropy`: DGCNN-style features: band-pass per band, then per window
  DE = 0.5 log(2 pi e var).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, sosfiltfilt

from .eeg import EEGDataset

# Frequency bands (Hz) of the SEED/DGCNN literature.
BANDS = {"delta": (1.0, 4.0), "theta": (4.0, 8.0), "alpha": (8.0, 14.0), "beta": (14.0, 31.0), "gamma": (31.0, 50.0)}


@dataclass
class EEGWindows:
    """Windows cut from trials, with what is needed to split them without leakage."""

    x: np.ndarray  # (n, channels, samples) or (n, channels, bands) for features
    subject: np.ndarray  # (n,) str
    trial: np.ndarray  # (n,) int, unique within a subject
    start: np.ndarray  # (n,) seconds from the start of the kept part of the trial
    targets: dict[str, np.ndarray]  # name -> (n,)
    sfreq: float
    channels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index) -> "EEGWindows":
        return EEGWindows(self.x[index], self.subject[index], self.trial[index], self.start[index],
                          {k: v[index] for k, v in self.targets.items()}, self.sfreq, self.channels)


def _assemble(ds: EEGDataset, per_trial) -> EEGWindows:
    """Stack per-trial window arrays (trial, (n, ...) array, (n,) start seconds)."""
    per_trial = list(per_trial)
    if not per_trial:
        raise ValueError(f"{ds.source or ds.name}: no trials to cut into windows")
    names = list(per_trial[0][0].targets)
    return EEGWindows(
        x=np.concatenate([w for _, w, _ in per_trial]).astype(np.float32),
        subject=np.concatenate([[t.subject] * len(w) for t, w, _ in per_trial]),
        trial=np.concatenate([[t.trial] * len(w) for t, w, _ in per_trial]).astype(int),
        start=np.concatenate([s for _, _, s in per_trial]),
        targets={k: np.concatenate([[t.targets[k]] * len(w) for t, w, _ in per_trial]) for k in names},
        sfreq=ds.sfreq,
        channels=ds.channels,
    )


def _windows(segment: np.ndarray, window: int, sfreq: float):
    """Non-overlapping windows of (channels, samples): ((n, channels, window), start seconds)."""
    n = segment.shape[1] // window
    w = segment[:, : n * window].reshape(segment.shape[0], n, window).transpose(1, 0, 2)
    return w, np.arange(n) * window / sfreq


def _seconds(ds: EEGDataset, seconds: float) -> int:
    return int(round(seconds * ds.sfreq))


def histn_windows(ds: EEGDataset, keep_seconds: float = 60.0, baseline_seconds: float = 10.0,
                  window_seconds: float = 1.0) -> EEGWindows:
    keep, base_len, window = _seconds(ds, keep_seconds), _seconds(ds, baseline_seconds), _seconds(ds, window_seconds)
    segments = []
    for t in ds.trials:
        where = f"{ds.source or ds.name}: subject {t.subject} trial {t.trial}"
        if t.signal.shape[1] < keep:
            raise ValueError(f"{where}: {t.signal.shape[1] / ds.sfreq:.1f} s of signal, shorter than the "
                             f"{keep_seconds:g} s kept")
        if t.baseline is None or t.baseline.shape[1] < base_len:
            got = "none" if t.baseline is None else f"{t.baseline.shape[1] / ds.sfreq:.1f} s"
            raise ValueError(f"{where}: needs a baseline of at least {baseline_seconds:g} s, got {got}")
        mid = (t.baseline.shape[1] - base_len) // 2
        ref = t.baseline[:, mid : mid + base_len].astype(np.float64)
        mu, sd = ref.mean(1, keepdims=True), ref.std(1, keepdims=True)
        sd[sd == 0] = 1.0  # a flat baseline channel: centre it, do not divide by zero
        z = (t.signal[:, -keep:] - mu) / sd
        peak = np.abs(z).max()
        segments.append((t, *_windows(z / peak if peak > 0 else z, window, ds.sfreq)))
    return _assemble(ds, segments)


def zscore_windows(ds: EEGDataset, window_seconds: float = 1.0) -> EEGWindows:
    """For corpora without HiSTN's long baselines (DEAP, SEED): per trial, z-score each channel
    over the whole trial, scale by the trial's max |x|, cut into windows."""
    window = _seconds(ds, window_seconds)
    per_trial = []
    for t in ds.trials:
        if t.signal.shape[1] < window:
            raise ValueError(f"{ds.source or ds.name}: subject {t.subject} trial {t.trial} has "
                             f"{t.signal.shape[1]} samples, shorter than one {window_seconds:g} s window")
        x = t.signal.astype(np.float64)
        sd = x.std(1, keepdims=True)
        z = (x - x.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
        peak = np.abs(z).max()
        per_trial.append((t, *_windows(z / peak if peak > 0 else z, window, ds.sfreq)))
    return _assemble(ds, per_trial)


def bandpass(x: np.ndarray, sfreq: float, low: float, high: float, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis."""
    nyq = sfreq / 2
    if not 0 < low < high:
        raise ValueError(f"band: expected 0 < low < high, got ({low}, {high})")
    high = min(high, 0.99 * nyq)
    if low >= high:
        raise ValueError(f"band: ({low}, {high}) Hz does not fit under the Nyquist frequency {nyq} Hz")
    sos = butter(order, [low / nyq, high / nyq], btype="bandpass", output="sos")
    return sosfiltfilt(sos, x, axis=-1)


def differential_entropy(ds: EEGDataset, window_seconds: float = 1.0, bands=BANDS) -> EEGWindows:
    """Per window, channel and band: 0.5 * log(2 pi e variance) of the band-passed signal."""
    window = _seconds(ds, window_seconds)
    per_trial = []
    for t in ds.trials:
        if t.signal.shape[1] < window:
            raise ValueError(f"{ds.source or ds.name}: subject {t.subject} trial {t.trial} is shorter than one "
                             f"{window_seconds:g} s window")
        signal = t.signal.astype(np.float64)
        # (bands, n, channels, window) -> variance over time -> (n, channels, bands)
        w = np.stack([_windows(bandpass(signal, ds.sfreq, lo, hi), window, ds.sfreq)[0] for lo, hi in bands.values()])
        de = 0.5 * np.log(2 * np.pi * np.e * np.maximum(w.var(axis=-1), 1e-12))
        per_trial.append((t, de.transpose(1, 2, 0), np.arange(w.shape[1]) * window / ds.sfreq))
    return _assemble(ds, per_trial)
