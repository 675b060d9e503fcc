"""The utterance-level feature set: frame-level descriptors summarised over time.

Frames are 25 ms windows every 10 ms (the usual speech analysis frame). Per utterance, in
this order:

- `mfcc_{i}_mean`, `mfcc_{i}_std`: MFCCs 0..n_mfcc-1 from a 64-band log-mel spectrogram
  (MFCC 0 follows overall loudness), mean and standard deviation over frames;
- `mfcc_delta_{i}_mean`, `mfcc_delta_{i}_std`: the same for their first time derivative;
- `rms_mean`, `rms_std`: frame root-mean-square amplitude (full scale = 1) over all frames;
- mean and std of `zcr` (zero crossings per sample), `spectral_centroid_hz`,
  `spectral_rolloff_hz` (85 % of spectral energy lies below it) and `spectral_flatness`
  (0 = tonal, 1 = white noise) over active frames only, those within 50 dB of the loudest
  frame (pauses have no meaningful spectral shape); all 0 for an all-zero clip;
- `f0_mean_hz`, `f0_std_hz`, `f0_p10_hz`, `f0_p90_hz`: fundamental frequency (probabilistic
  YIN, searched in [fmin, fmax], default 60-600 Hz) over voiced frames only, all 0 when no
  frame is voiced (silence, noise, whisper), and
  `voiced_fraction`, the share of voiced frames, which tells that case apart;
- `duration_s`.

The units differ (Hz, seconds, dB-based MFCCs), so standardise the columns (e.g. with
statistics of the training set) before feeding a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import require_audio_libs

FRAME_FEATURES = ("rms", "zcr", "spectral_centroid_hz", "spectral_rolloff_hz", "spectral_flatness")
PITCH_FEATURES = ("f0_mean_hz", "f0_std_hz", "f0_p10_hz", "f0_p90_hz", "voiced_fraction")
N_MELS = 64
# Spectral shape and zero crossings of near-silent frames (pauses: digital zeros or resampler
# residue at -150 dB) are arbitrary, so those statistics skip frames this far below the
# loudest frame. Relative, so scaling the whole clip changes nothing.
ACTIVE_RANGE_DB = 50.0


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    n_mfcc: int = 40
    # Pitch search range in Hz: low male to high (excited) female speech. pYIN's cost grows
    # with the square of the number of pitch bins (10 per semitone), so it is kept to speech.
    fmin: float = 60.0
    fmax: float = 600.0

    @property
    def win_length(self) -> int:  # 25 ms
        return round(0.025 * self.sample_rate)

    @property
    def hop_length(self) -> int:  # 10 ms
        return round(0.010 * self.sample_rate)

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()

    @property
    def pitch_frame(self) -> int:
        # At least two periods of fmin must fit in a frame (librosa's advice for yin/pyin).
        return 1 << int(2 * (self.sample_rate / self.fmin + 1)).bit_length()


def feature_names(n_mfcc: int) -> list[str]:
    names = []
    for block in ("mfcc", "mfcc_delta"):
        names += [f"{block}_{i}_mean" for i in range(n_mfcc)]
        names += [f"{block}_{i}_std" for i in range(n_mfcc)]
    for f in FRAME_FEATURES:
        names += [f"{f}_mean", f"{f}_std"]
    return names + list(PITCH_FEATURES) + ["duration_s"]


def _mean_std(frames: np.ndarray) -> list[np.ndarray]:
    """(..., t) -> [mean over t, std over t], in float64."""
    frames = np.asarray(frames, dtype=np.float64)
    return [frames.mean(axis=-1), frames.std(axis=-1)]


def _active_frames(rms: np.ndarray) -> np.ndarray:
    """Frames within ACTIVE_RANGE_DB of the loudest one (none if the clip is all zeros)."""
    return (rms > 0) & (rms >= rms.max() * 10 ** (-ACTIVE_RANGE_DB / 20))


def _pitch_stats(y: np.ndarray, cfg: FeatureConfig) -> list[float]:
    librosa, _ = require_audio_libs()
    f0, voiced, _ = librosa.pyin(y, fmin=cfg.fmin, fmax=cfg.fmax, sr=cfg.sample_rate,
                                 frame_length=cfg.pitch_frame, hop_length=cfg.hop_length)
    f0 = f0[voiced & np.isfinite(f0)].astype(np.float64)
    if f0.size == 0:
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    p10, p90 = np.percentile(f0, [10, 90])
    return [f0.mean(), f0.std(), p10, p90, f0.size / len(voiced)]


def compute_features(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Mono float32 samples at cfg.sample_rate -> (dim,) float64 in feature_names order."""
    librosa, _ = require_audio_libs()
    sr, hop, win = cfg.sample_rate, cfg.hop_length, cfg.win_length
    mag = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=hop, win_length=win))
    mel = librosa.feature.melspectrogram(S=mag**2, sr=sr, n_mels=N_MELS)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=cfg.n_mfcc)
    delta = librosa.feature.delta(mfcc)
    rms = librosa.feature.rms(y=y, frame_length=win, hop_length=hop)[0]
    shape_feats = [
        librosa.feature.zero_crossing_rate(y, frame_length=win, hop_length=hop)[0],
        librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=cfg.n_fft)[0],
        librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=cfg.n_fft, roll_percent=0.85)[0],
        # Relative to the loudest bin: librosa's absolute floor would make it depend on volume.
        librosa.feature.spectral_flatness(S=mag / max(float(mag.max()), 1e-30))[0],
    ]
    active = _active_frames(rms)
    parts = _mean_std(mfcc) + _mean_std(delta) + [np.atleast_1d(s) for s in _mean_std(rms)]
    for f in shape_feats:
        on = f[active[:len(f)]]  # all framings here are centred with one hop: same frame count
        parts += [np.atleast_1d(s) for s in _mean_std(on)] if on.size else [np.zeros(1)] * 2
    parts.append(np.asarray(_pitch_stats(y, cfg), dtype=np.float64))
    parts.append(np.array([len(y) / sr]))
    return np.concatenate(parts)
