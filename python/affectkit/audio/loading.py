"""Argument checks and audio decoding: any file libsndfile reads -> mono float32 at one rate."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from ._backend import require_audio_libs

# Shorter clips have too few 10 ms frames for the delta features (a 9-frame window).
MIN_DURATION_S = 0.1


def check_paths(paths) -> list[Path]:
    """`paths`: a sequence of str or os.PathLike (not a single path) -> list of Path."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"paths: expected a sequence of file paths, got a single path {paths!r} "
                        "(wrap it in a list)")
    try:
        items = list(paths)
    except TypeError:
        raise TypeError(f"paths: expected a sequence of file paths, got {type(paths).__name__}") from None
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"paths: expected str or os.PathLike items, got {type(p).__name__} "
                            f"at position {i}")
        if isinstance(p, str) and not p.strip():
            raise ValueError(f"paths: expected a file path, got an empty string at position {i}")
        out.append(Path(p))
    return out


def read_file_bytes(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if not path.is_file():
        raise ValueError(f"audio file {path}: expected a regular file, got a directory or special file")
    return path.read_bytes()


def decode_mono(data: bytes, path: Path, sample_rate: int) -> np.ndarray:
    """Decode file bytes, average the channels and resample to `sample_rate` (float32)."""
    librosa, soundfile = require_audio_libs()
    if not data:
        raise ValueError(f"audio file {path}: the file is empty (0 bytes)")
    try:
        samples, file_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"audio file {path}: could not decode it as audio "
                         f"(a format libsndfile reads, e.g. WAV, FLAC, OGG, MP3, is expected): {e}") from e
    if samples.shape[0] == 0:
        raise ValueError(f"audio file {path}: contains no samples (zero-length audio)")
    if not np.isfinite(samples).all():
        raise ValueError(f"audio file {path}: contains NaN or infinite samples")
    mono = samples.mean(axis=1)
    if file_rate != sample_rate:
        mono = librosa.resample(mono, orig_sr=file_rate, target_sr=sample_rate)
    duration = len(mono) / sample_rate
    if duration < MIN_DURATION_S:
        raise ValueError(f"audio file {path}: too short ({duration * 1000:.1f} ms); "
                         f"expected at least {MIN_DURATION_S * 1000:.0f} ms of audio")
    return np.ascontiguousarray(mono, dtype=np.float32)
