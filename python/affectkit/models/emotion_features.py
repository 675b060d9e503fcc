"""Features that add the `text-emotion` model's view of a text to the shared ones.

Empathy and distress are carried by what a writer feels and says they feel, which the encoder
fine-tuned on GoEmotions represents better than the frozen one. For an essay the features are:
the shared features (frozen sentence embedding + lexicon), the emotion encoder's embedding of
the whole text (whose first 256 word pieces it reads), and the mean of its embeddings of each
sentence (which sees all of a long essay, one sentence at a time).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..text.encoder import clean_texts
from ..text.features import FeatureExtractor
from ..text.sentences import mean_by_owner, split_sentences

KIND = "emotion-augmented"


def weights_digest(name_or_path) -> str:
    """SHA-256 of a model's weights file: ties a dependent model to the exact weights it was
    trained on."""
    from . import resolve

    return hashlib.sha256(resolve(name_or_path).read_bytes()).hexdigest()


class EmotionAugmentedFeatures(FeatureExtractor):
    """texts -> (n, shared dim + 2 * emotion dim) float32.

    emotion_model: a name or folder `affectkit.load` takes (`text-emotion` by default); digest:
    the SHA-256 its weights must have (a model trained on these features is only valid with
    them), or None to accept any.
    """

    def __init__(self, encoder=None, emotion_model: str = "text-emotion", digest: str | None = None):
        super().__init__(encoder)
        self.emotion_model_name, self.digest = emotion_model, digest
        self._emotion = None

    @property
    def emotion_model(self):
        if self._emotion is None:
            from . import load

            found = weights_digest(self.emotion_model_name)
            if self.digest is not None and found != self.digest:
                raise ValueError(
                    f"emotion_model: this model was trained on the features of {self.emotion_model_name!r} "
                    f"with weights sha256 {self.digest[:12]}..., but those weights now have {found[:12]}...; "
                    "retrain it (`affectkit train empathy`) against the current emotion model")
            self._emotion = load(self.emotion_model_name)
        return self._emotion

    def __call__(self, texts, *, progress: bool = False) -> np.ndarray:
        shared = super().__call__(texts, progress=progress)
        texts = clean_texts(texts)
        model = self.emotion_model
        whole = model.embed(texts, progress=progress)
        sentences, owner = split_sentences(texts)
        per_sentence = mean_by_owner(model.embed(sentences, progress=progress), owner, len(texts))
        return np.hstack([shared, whole, per_sentence]).astype(np.float32, copy=False)
