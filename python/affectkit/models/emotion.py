"""`text-emotion`: GoEmotions' 27 emotions + neutral, multi-label, calibrated probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from ..data.goemotions import EKMAN
from ..text.encoder import clean_texts
from ..text.lexicon import lexicon_features
from ..text.ngrams import hashed_ngrams
from .base import WEIGHTS_FILE, head_from_state, run_head, save_weights, shared_features
from .calibration import decide


class TextEmotionModel:
    """Multi-label emotion classifier over sentence-embedding + lexicon features.

    With config["tuned_layers"] = k > 0 the embedding comes from the encoder whose top k layers
    were fine-tuned with the head (their weights are in the model file); otherwise from the
    frozen, cached encoder. `predict_proba` returns sigmoid(logits / temperature), the
    temperature fitted on GoEmotions dev; `predict` applies per-label thresholds chosen on dev.
    `features` (the frozen encoder) also embeds texts for `nearest_examples`.
    """

    kind = "text-emotion"

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, features=None):
        if config.get("kind") != self.kind:
            raise ValueError(f"config: expected kind {self.kind!r}, got {config.get('kind')!r}")
        self.config = config
        self.labels: tuple[str, ...] = tuple(config["labels"])
        self.head = head_from_state(tensors, config)
        self.temperature = float(tensors["temperature"].item())
        self.thresholds = tensors["thresholds"].double().numpy()
        self.features = features if features is not None else shared_features(config["encoder"])
        self.tuned = _tuned_net(tensors, config, self.head) if config.get("tuned_layers", 0) else None
        self.ekman_labels: tuple[str, ...] = tuple(EKMAN)
        groups = np.zeros((len(self.labels), len(EKMAN)), dtype=bool)
        for j, members in enumerate(EKMAN.values()):
            for name in members:
                if name in self.labels:
                    groups[self.labels.index(name), j] = True
        self._ekman = groups

    def logits(self, texts, *, progress: bool = False) -> np.ndarray:
        texts = clean_texts(texts)
        n_hash = self.config.get("ngram_features", 0)
        sparse = hashed_ngrams(texts, n_hash) if n_hash else None
        if self.tuned is not None:
            from .finetune import run_net

            return np.concatenate([
                run_net(self.tuned, states, lexicon_features(texts[i:i + len(states)]),
                        sparse[i:i + len(states)] if sparse is not None else None)
                for i, states in self._frozen_chunks(texts, progress)])
        return run_head(self.head, self.features(texts, progress=progress), sparse)

    # Texts per chunk of frozen token states: a chunk's states (tokens x 384 floats per text)
    # stay in memory only while that chunk runs, so long inputs do not hold them all at once.
    CHUNK = 2048

    def _frozen_chunks(self, texts: list[str], progress: bool):
        """(offset, token states after the frozen layers) for consecutive chunks of texts."""
        from rich.progress import Progress

        from .finetune import frozen_states

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("encoding", total=len(texts))
            for i in range(0, len(texts), self.CHUNK):
                yield i, frozen_states(self.tuned.encoder, texts[i:i + self.CHUNK])
                bar.advance(task, min(self.CHUNK, len(texts) - i))

    def embed(self, texts, *, progress: bool = False) -> np.ndarray:
        """(n, d) float32: the L2-normalised embedding this model classifies (from its fine-tuned
        encoder when it has one, else the frozen encoder's). Other models reuse it as features."""
        texts = clean_texts(texts)
        if self.tuned is None:
            return self.features.encoder.encode(texts, progress=progress)
        self.tuned.eval()
        out = []
        with torch.no_grad():
            for _, states in self._frozen_chunks(texts, progress):
                out += [self.tuned.embed(states[j:j + 256]) for j in range(0, len(states), 256)]
        return torch.cat(out).numpy()

    def predict_proba(self, texts, *, progress: bool = False) -> np.ndarray:
        """(n, 28) calibrated probabilities, columns in `.labels` order."""
        return expit(self.logits(texts, progress=progress) / self.temperature)

    def decide(self, probs: np.ndarray) -> list[list[str]]:
        """Labels over their thresholds for each row of `probs`, most probable first."""
        chosen = decide(probs, self.thresholds)
        out = []
        for p, row in zip(probs, chosen):
            idx = sorted(np.flatnonzero(row), key=lambda j: -p[j])
            out.append([self.labels[j] for j in idx])
        return out

    def predict(self, texts, *, progress: bool = False) -> list[list[str]]:
        return self.decide(self.predict_proba(texts, progress=progress))

    def ekman_proba(self, probs: np.ndarray) -> np.ndarray:
        """(n, 7) score per Ekman group: the highest probability among its member labels."""
        return np.stack([probs[:, self._ekman[:, j]].max(axis=1) for j in range(len(self.ekman_labels))], axis=1)

    def predict_ekman(self, texts) -> list[list[str]]:
        """Ekman groups (anger, disgust, fear, joy, sadness, surprise, neutral) holding a predicted label."""
        chosen = decide(self.predict_proba(texts), self.thresholds)
        hit = chosen.astype(np.int32) @ self._ekman.astype(np.int32) > 0
        return [[g for g, h in zip(self.ekman_labels, row) if h] for row in hit]

    def nearest_examples(self, texts, k: int = 3, *, same_emotion: bool = True, emotions=None, data=None,
                         progress: bool = False) -> list[list[dict]]:
        """Per text, the k most similar GoEmotions training comments (cosine similarity of the
        sentence embeddings), as dicts with `text`, `labels`, `similarity` and `row`.

        same_emotion: keep only comments labelled with the text's predicted emotion (its most
        probable label over threshold; or `emotions[i]` when given). The training index is built
        from the GoEmotions train split under `data` (or $AFFECTKIT_DATA) and cached on disk;
        without that data this raises `affectkit.retrieval.TrainingDataMissing`.
        """
        from ..retrieval.corpus import model_training_index

        texts = clean_texts(texts)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        index = model_training_index(self, data, progress=progress)
        if emotions is not None:
            emotions = list(emotions)
            if len(emotions) != len(texts):
                raise ValueError(f"emotions: expected one emotion per text ({len(texts)}), got {len(emotions)}")
            for e in emotions:
                if e not in self.labels:
                    raise ValueError(f"emotions: expected labels from {list(self.labels)}, got {e!r}")
        elif same_emotion:
            emotions = [row[0] for row in self.predict(texts)]
        # strict=False: an emotion no training example carries (a model trained elsewhere) finds none.
        found = index.search(texts, k, encoder=self.features.encoder, labels=emotions if same_emotion else None,
                             strict=False)
        return [[e.as_dict() for e in row] for row in found]

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / WEIGHTS_FILE
        # The n-gram table is most of the file; float16 halves it at no measurable cost.
        tensors = {f"head.{k}": v.half() if k == "sparse_weight" else v for k, v in self.head.state_dict().items()}
        if self.tuned is not None:  # float16 too: the layers are most of the file
            tensors.update({f"encoder.layers.{k}": v.half() for k, v in self.tuned.encoder.layers.state_dict().items()})
        tensors["temperature"] = torch.tensor([self.temperature], dtype=torch.float32)
        tensors["thresholds"] = torch.from_numpy(self.thresholds.astype(np.float32))
        save_weights(path, tensors, self.config)
        return path




def _tuned_net(tensors: dict[str, torch.Tensor], config: dict, head):
    """The fine-tuned encoder layers stored in the model file, joined to `head`."""
    from ..text.utterance_encoder import UtteranceEncoder
    from .finetune import TunedTextNet

    encoder = UtteranceEncoder(config["encoder"], config["tuned_layers"])
    prefix = "encoder.layers."
    encoder.layers.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
    return TunedTextNet(encoder, head).eval()
