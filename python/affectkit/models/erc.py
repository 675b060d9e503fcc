"""`erc-meld`: emotion recognition in conversation, text only, on M2FNet.

Each utterance is encoded by all-MiniLM-L6-v2 whose top layers were fine-tuned on MELD (on
affectkit's attention), joined with NRC EmoLex features, and classified in the context of its
dialogue by M2FNet (speaker embeddings and a dialogue transformer on the fused kernel).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from ..data.meld import LABELS
from ..text.encoder import clean_texts
from ..text.lexicon import NUM_FEATURES, lexicon_features
from ..text.utterance_encoder import UtteranceEncoder
from .base import WEIGHTS_FILE, save_weights
from .m2fnet import M2FNet, speaker_ids


# Per-utterance features joined to the tuned encoder's vector: NRC EmoLex and surface cues, and
# the logits of the shipped GoEmotions model (what 43k Reddit comments taught about emotion words).
EXTRA_FEATURES = {"lexicon": NUM_FEATURES, "text-emotion": 28}


def extra_features(texts: list[str], names: Sequence[str]) -> torch.Tensor:
    """(n, sum of widths) float32 features named in `names` (keys of EXTRA_FEATURES)."""
    cols = []
    for name in names:
        if name == "lexicon":
            cols.append(lexicon_features(texts))
        elif name == "text-emotion":
            cols.append(_text_emotion_model().logits(texts).astype(np.float32))
        else:
            raise ValueError(f"extra_features: expected names among {list(EXTRA_FEATURES)}, got {name!r}")
    if not cols:
        return torch.zeros(len(texts), 0)
    return torch.from_numpy(np.hstack(cols).astype(np.float32))


@lru_cache(maxsize=1)
def _text_emotion_model():
    """Loaded once per process: it carries its own tuned encoder, slow to build per batch."""
    from . import load

    return load("text-emotion")


class ERCNet(nn.Module):
    """Tuned utterance encoder + extra per-utterance features -> M2FNet over each dialogue."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.encoder = UtteranceEncoder(config["encoder"], config["tuned_layers"], dropout=config["encoder_dropout"])
        extra = sum(EXTRA_FEATURES[n] for n in config.get("extra_features", ["lexicon"]))
        self.m2fnet = M2FNet(self.encoder.dim + extra, (), len(config["labels"]), d_model=config["d_model"],
                             num_heads=config["num_heads"], num_layers=config["num_layers"], dropout=config["dropout"])

    def forward(self, states: list[torch.Tensor], extra: torch.Tensor, speakers: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """states/extra: every utterance of the batch, dialogue after dialogue; speakers
        (B, L); lengths (B,). Returns logits (B, L, classes)."""
        feats = torch.cat([self.encoder.pool(states), extra], dim=1)
        B, L = speakers.shape
        valid = torch.arange(L)[None, :] < lengths[:, None]
        text = feats.new_zeros(B, L, feats.shape[1]).index_put((valid.nonzero(as_tuple=True)), feats)
        return self.m2fnet(text, speakers, lengths)


    def to_torch_attention(self) -> "ERCNet":
        """A copy with the same weights whose every attention runs on stock PyTorch
        (torch.nn.MultiheadAttention in M2FNet, scaled_dot_product_attention in the encoder)."""
        twin = copy.copy(self)  # shallow: shares the frozen base; the tuned parts are replaced
        twin._modules = dict(self._modules)
        twin.encoder = copy.copy(self.encoder)
        twin.encoder._modules = dict(self.encoder._modules)
        twin.encoder.layers = copy.deepcopy(self.encoder.layers)
        for layer in twin.encoder.layers:
            layer.attention = "torch"
        twin.m2fnet = self.m2fnet.to_torch_attention()
        return twin


def pack(dialogues: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speaker ids per dialogue -> (speakers (B, L) int64, lengths (B,) int64)."""
    L = max(len(d) for d in dialogues)
    speakers = torch.zeros(len(dialogues), L, dtype=torch.long)
    for b, ids in enumerate(dialogues):
        speakers[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return speakers, torch.tensor([len(d) for d in dialogues], dtype=torch.long)


def check_dialogue(utterances, where: str = "utterances") -> tuple[list[str], list[str]]:
    """Validate a list of (speaker, text) pairs; returns (speakers, texts)."""
    if isinstance(utterances, (str, bytes)) or not isinstance(utterances, Sequence):
        raise TypeError(f"{where}: expected a list of (speaker, text) pairs, got {type(utterances).__name__}")
    if not utterances:
        raise ValueError(f"{where}: expected at least one (speaker, text) pair, got an empty dialogue")
    speakers, texts = [], []
    for i, pair in enumerate(utterances):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{where}[{i}]: expected a (speaker, text) pair, got {pair!r}")
        speaker, text = pair
        if not isinstance(speaker, str) or not speaker.strip():
            raise ValueError(f"{where}[{i}]: expected a speaker name, got {speaker!r}")
        if not isinstance(text, str):
            raise TypeError(f"{where}[{i}]: expected the utterance as text, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where}[{i}]: the utterance of {speaker!r} is empty")
        speakers.append(speaker)
        texts.append(text)
    return speakers, texts


class ERCModel:
    """In-context emotion of each utterance of a dialogue (MELD's 7 emotions).

    ``predict_dialogue_proba(utterances)`` takes ``[(speaker, text), ...]`` in order and returns
    (n, 7) probabilities (columns in ``.labels`` order, temperature-calibrated on MELD dev);
    ``predict_dialogue`` the most probable emotion of each utterance. Speakers are told apart
    by name within the dialogue; any names work.
    """

    kind = "erc"
    labels: tuple[str, ...] = tuple(LABELS)

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, net: ERCNet | None = None):
        if config.get("kind") != self.kind:
            raise ValueError(f"config: expected kind {self.kind!r}, got {config.get('kind')!r}")
        self.config = config
        self.labels = tuple(config["labels"])
        self.net = net if net is not None else ERCNet(config)
        state = {k[len("net."):]: v.float() for k, v in tensors.items() if k.startswith("net.")}
        if state:
            self.net.load_state_dict(state)
        self.net.eval()
        self.temperature = float(tensors["temperature"].item()) if "temperature" in tensors else 1.0

    @torch.no_grad()
    def logits_dialogues(self, dialogues, *, batch: int = 16) -> list[np.ndarray]:
        """Raw logits, one (n_i, 7) array per dialogue."""
        parsed = [check_dialogue(d, f"dialogues[{i}]") for i, d in enumerate(dialogues)]
        out = []
        for start in range(0, len(parsed), batch):
            chunk = parsed[start:start + batch]
            texts = clean_texts([t for _, ts in chunk for t in ts])
            states = self.net.encoder.frozen_states(texts)
            extra = extra_features(texts, self.config.get("extra_features", ["lexicon"]))
            speakers, lengths = pack([speaker_ids(s) for s, _ in chunk])
            logits = self.net(states, extra, speakers, lengths)
            out += [logits[b, : int(n)].double().numpy() for b, n in enumerate(lengths)]
        return out

    def predict_dialogues_proba(self, dialogues) -> list[np.ndarray]:
        return [softmax(z / self.temperature, axis=1) for z in self.logits_dialogues(dialogues)]

    def predict_dialogue_proba(self, utterances) -> np.ndarray:
        """(n, 7) calibrated probabilities for the utterances of one dialogue."""
        return self.predict_dialogues_proba([utterances])[0]

    def predict_dialogue(self, utterances) -> list[str]:
        return [self.labels[j] for j in self.predict_dialogue_proba(utterances).argmax(axis=1)]

    def save(self, out_dir, *, half: bool = False) -> Path:
        """model.safetensors holds the tuned layers and M2FNet (the frozen base comes from
        its package); ``half`` stores float16 (what ships)."""
        tensors = {f"net.{k}": (v.half() if half and v.is_floating_point() else v) for k, v in self.net.state_dict().items()}
        tensors["temperature"] = torch.tensor([self.temperature], dtype=torch.float32)
        path = Path(out_dir) / WEIGHTS_FILE
        save_weights(path, tensors, self.config)
        return path
