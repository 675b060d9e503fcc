"""`vad` (EmoBank valence, arousal, dominance, 1..5) and `empathy` (empathic concern and
personal distress, 1..7): regression heads over the same features as `text-emotion`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import WEIGHTS_FILE, head_from_state, run_head, save_weights, shared_features


class RegressionModel:
    """`.targets` names the output columns; `.predict(texts) -> (n, len(targets))` on the
    corpus' rating scale (clipped to `.scale`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, features=None):
        if config.get("kind") not in ("vad", "empathy"):
            raise ValueError(f"config: expected kind 'vad' or 'empathy', got {config.get('kind')!r}")
        self.kind = config["kind"]
        self.config = config
        self.targets: tuple[str, ...] = tuple(config["targets"])
        self.scale = tuple(config["scale"])
        self.head = head_from_state(tensors, config)
        # The head predicts standardised targets; these undo that.
        self.target_mean = tensors["target_mean"].double().numpy()
        self.target_std = tensors["target_std"].double().numpy()
        self.features = features if features is not None else _features_for(config)
        # Optional second view (empathy): a ridge over character n-grams, blended into the
        # head's prediction with weight config["char_ngrams"]["weight"].
        self.char_ngrams = None
        if config.get("char_ngrams"):
            from .ngram_ridge import CharNgramRidge

            self.char_ngrams = CharNgramRidge.from_tensors(tensors, "char_ngrams.")
            self.char_ngram_weight = float(config["char_ngrams"]["weight"])
            if not 0.0 <= self.char_ngram_weight <= 1.0:
                raise ValueError(f"config: expected char_ngrams.weight in [0, 1], got {self.char_ngram_weight}")

    @property
    def labels(self) -> tuple[str, ...]:
        return self.targets

    def predict(self, texts, *, progress: bool = False) -> np.ndarray:
        from ..text.encoder import clean_texts

        texts = clean_texts(texts)  # once here: a truncation warns once, not once per view
        return self.predict_features(self.features(texts, progress=progress), texts)

    def predict_features(self, x: np.ndarray, texts=None) -> np.ndarray:
        """Predictions from precomputed features x of `texts` (the texts themselves are needed
        too when the model blends in its character n-gram view)."""
        y = run_head(self.head, x) * self.target_std + self.target_mean
        if self.char_ngrams is not None:
            if texts is None:
                raise ValueError("texts: this model also reads character n-grams; pass the texts with their features")
            from ..text.encoder import clean_texts

            texts = clean_texts(texts)
            if len(texts) != len(x):  # one text would broadcast silently over every row
                raise ValueError(f"texts: expected one text per feature row ({len(x)}), got {len(texts)}")
            w = self.char_ngram_weight
            y = (1 - w) * y + w * self.char_ngrams.predict(texts)
        return np.clip(y, *self.scale)

    def nearest_examples(self, texts, k: int = 3, *, data=None, progress: bool = False) -> list[list[dict]]:
        """Per text, the k most similar training texts (EmoBank train for `vad`, the training
        essays for `empathy`; cosine similarity of the sentence embeddings), as dicts with
        `text`, gold `scores`, `similarity` and `row`. The index is built from the corpus under
        `data` (or $AFFECTKIT_DATA) and cached on disk; without that data this raises
        `affectkit.retrieval.TrainingDataMissing`.
        """
        from ..retrieval.corpus import model_training_index
        from ..text.encoder import clean_texts

        texts = clean_texts(texts)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        index = model_training_index(self, data, progress=progress)
        return [[e.as_dict() for e in row] for row in index.search(texts, k, encoder=self.features.encoder)]

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / WEIGHTS_FILE
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensors["target_mean"] = torch.from_numpy(self.target_mean.astype(np.float32))
        tensors["target_std"] = torch.from_numpy(self.target_std.astype(np.float32))
        if self.char_ngrams is not None:
            tensors.update(self.char_ngrams.tensors("char_ngrams."))
        save_weights(path, tensors, self.config)
        return path


def _features_for(config: dict):
    """The feature extractor a saved model was trained on."""
    kind = config.get("features", "shared")
    if kind == "shared":
        return shared_features(config["encoder"])
    from .emotion_features import KIND, EmotionAugmentedFeatures

    if kind != KIND:
        raise ValueError(f"config: expected features 'shared' or {KIND!r}, got {kind!r}")
    return EmotionAugmentedFeatures(shared_features(config["encoder"]).encoder, config["emotion_model"],
                                    config.get("emotion_model_sha256"))
