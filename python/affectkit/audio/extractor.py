"""Audio files -> (n, dim) float32 utterance feature matrix, with an on-disk cache."""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from ..text.cache import EmbeddingCache
from ._backend import require_audio_libs
from .features import FeatureConfig, compute_features, feature_names
from .loading import check_paths, decode_mono, read_file_bytes


def _check_number(name, value, lo, hi, *, integer):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}], got {value}")


class AudioFeatureExtractor:
    """Per-utterance audio files -> fixed-size feature vectors (see affectkit.audio.features).

    Files are decoded with libsndfile (WAV, FLAC, OGG, MP3, ...), mixed down to mono (mean of
    the channels) and resampled to `sample_rate`. Results are cached on disk keyed by the
    SHA-256 of the file's bytes and the settings, so a renamed or copied file is a cache hit
    and an edited one is not. `cache` is True (under `cache_root`, default
    $AFFECTKIT_CACHE or ~/.cache/affectkit), False, or an EmbeddingCache; it is written every
    `flush_every` computed files and when a call ends, even by an error. `calls` counts files
    whose features were actually computed.
    """

    def __init__(self, sample_rate: int = 16000, *, n_mfcc: int = 40, fmin: float = 60.0,
                 fmax: float = 600.0, cache: bool | EmbeddingCache = True, cache_root=None,
                 flush_every: int = 200):
        librosa, _ = require_audio_libs()
        # From telephone speech up; below 8 kHz the 64 mel bands would not all get FFT bins.
        _check_number("sample_rate", sample_rate, 8000, 192000, integer=True)
        _check_number("n_mfcc", n_mfcc, 1, 64, integer=True)
        _check_number("fmin", fmin, 20.0, sample_rate / 2, integer=False)
        _check_number("fmax", fmax, 20.0, sample_rate / 2, integer=False)
        if fmin >= fmax:
            raise ValueError(f"fmin, fmax: expected fmin < fmax, got fmin={fmin}, fmax={fmax}")
        self.config = FeatureConfig(int(sample_rate), int(n_mfcc), float(fmin), float(fmax))
        self.names = feature_names(self.config.n_mfcc)
        self.dim = len(self.names)
        # Feature values may shift between librosa versions, so the version is in the key.
        self.cache_id = f"affectkit-audio-v1|{self.config}|librosa-{librosa.__version__}"
        if cache is True:
            cache = EmbeddingCache(self.cache_id, cache_root)
        elif cache is not False and not isinstance(cache, EmbeddingCache):
            raise TypeError(f"cache: expected True, False or an EmbeddingCache, got {type(cache).__name__}")
        self.cache: EmbeddingCache | None = cache if isinstance(cache, EmbeddingCache) else None
        _check_number("flush_every", flush_every, 1, 10**9, integer=True)
        self.flush_every = int(flush_every)  # files computed between cache writes
        self.calls = 0

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def _compute(self, path, data: bytes) -> np.ndarray:
        y = decode_mono(data, path, self.config.sample_rate)
        self.calls += 1
        vec = compute_features(y, self.config)
        bad = [n for n, v in zip(self.names, vec) if not np.isfinite(v)]
        if bad:  # a bug, not bad input: decode_mono already rejects non-finite samples
            raise RuntimeError(f"audio file {path}: non-finite features {bad[:5]}")
        return vec.astype(np.float32)

    def __call__(self, paths) -> np.ndarray:
        """A sequence of audio file paths -> (len(paths), dim) float32, rows in input order."""
        paths = check_paths(paths)
        out = np.empty((len(paths), self.dim), dtype=np.float32)
        seen: dict[bytes, np.ndarray] = {}  # computed in this call: repeated files count once
        unsaved: dict[bytes, np.ndarray] = {}
        try:
            for i, path in enumerate(paths):
                data = read_file_bytes(path)
                key = hashlib.sha256(data).digest()
                row = seen.get(key)
                if row is None and self.cache is not None:
                    row = self.cache.get_many([key])[0]
                if row is None:
                    row = seen[key] = unsaved[key] = self._compute(path, data)
                    if len(unsaved) >= self.flush_every:
                        self._save(unsaved)
                out[i] = row
        finally:
            # Also when a later file is bad or the run is interrupted: finished work is kept.
            self._save(unsaved)
        return out

    def _save(self, rows: dict[bytes, np.ndarray]) -> None:
        if self.cache is not None and rows:
            self.cache.put_many(list(rows), np.stack(list(rows.values())))
        rows.clear()


def audio_features(paths, *, sample_rate: int = 16000, **kwargs) -> np.ndarray:
    """Function form of AudioFeatureExtractor(sample_rate, **kwargs)(paths)."""
    return AudioFeatureExtractor(sample_rate, **kwargs)(paths)
