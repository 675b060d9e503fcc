"""Utterance-level audio features for the conversation models (optional extra: affectkit[audio]).

    from affectkit.audio import AudioFeatureExtractor
    ex = AudioFeatureExtractor()              # 16 kHz mono, 40 MFCCs
    X = ex(["utt1.wav", "utt2.wav"])          # (2, ex.dim) float32, columns named ex.names

The feature set is documented in affectkit.audio.features. Needs librosa and soundfile
(`pip install 'affectkit[audio]'`); without them the extractor raises ImportError saying so.
"""

from .extractor import AudioFeatureExtractor, audio_features
from .features import FeatureConfig, feature_names
from .loading import MIN_DURATION_S

__all__ = ["AudioFeatureExtractor", "FeatureConfig", "MIN_DURATION_S", "audio_features", "feature_names"]
