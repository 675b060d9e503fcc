"""The optional audio libraries, imported on first use with an install hint when absent."""

from __future__ import annotations

INSTALL_HINT = "pip install 'affectkit[audio]'"


def require_audio_libs():
    """Return (librosa, soundfile), or raise ImportError telling the user how to get them."""
    try:
        import librosa
        import soundfile
    except ImportError as e:  # the missing module's name is in e.name
        raise ImportError(
            f"affectkit.audio needs librosa and soundfile ({e.name or e} is not installed); "
            f"install them with: {INSTALL_HINT}") from e
    return librosa, soundfile
