"""What every text model shares: the MLP head, input standardisation, and the file format
(one safetensors file of tensors, with the model's JSON config in its metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..text.cache import atomic_write_bytes
from ..text.encoder import TextEncoder
from ..text.features import FeatureExtractor

FORMAT = "affectkit-text-model/1"
WEIGHTS_FILE = "model.safetensors"

_ENCODERS: dict[str, TextEncoder] = {}


def shared_features(encoder_name: str) -> FeatureExtractor:
    """One encoder per name per process, so loading several models loads the network once."""
    if encoder_name not in _ENCODERS:
        _ENCODERS[encoder_name] = TextEncoder(encoder_name)
    return FeatureExtractor(_ENCODERS[encoder_name])


class Head(nn.Module):
    """Standardise the features, then one hidden layer (or none: hidden=0 is linear)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))

    def set_standardisation(self, x: np.ndarray) -> None:
        self.mean.copy_(torch.from_numpy(x.mean(0)))
        self.std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def head_from_state(state: dict[str, torch.Tensor], config: dict) -> Head:
    head = Head(config["in_dim"], config["out_dim"], config["hidden"])
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    return head.eval()


def save_weights(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write atomically: an interrupted save never leaves a half-written model behind."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={"format": FORMAT, "config": json.dumps(config)})
    atomic_write_bytes(Path(path), lambda f: f.write(blob))


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors model file ({err})") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: expected an affectkit text model ({FORMAT}), got format {meta.get('format')!r}")
    return tensors, json.loads(meta["config"])


@torch.no_grad()
def run_head(head: Head, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    out = [head(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.float64)
