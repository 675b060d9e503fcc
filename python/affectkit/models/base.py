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
    """Standardise the features, then one hidden layer (or none: hidden=0 is linear); plus,
    when sparse_dim > 0, a linear layer over hashed n-grams added to the output."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float = 0.0, sparse_dim: int = 0):
        super().__init__()
        self.sparse_dim = sparse_dim
        if sparse_dim:
            self.sparse_weight = nn.Parameter(torch.zeros(sparse_dim, out_dim))
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

    def forward(self, x: torch.Tensor, sparse: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net((x - self.mean) / self.std)
        if self.sparse_dim:
            if sparse is None:
                raise ValueError("sparse: this head also needs the hashed n-gram features")
            out = out + torch.sparse.mm(sparse, self.sparse_weight)
        return out


def head_from_state(state: dict[str, torch.Tensor], config: dict) -> Head:
    head = Head(config["in_dim"], config["out_dim"], config["hidden"], sparse_dim=config.get("ngram_features", 0))
    # Shipped weights may be stored in float16 to halve their size.
    head.load_state_dict({k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")})
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


def sparse_tensor(m) -> torch.Tensor:
    """scipy CSR -> torch sparse COO (float32)."""
    m = m.tocsr()
    m.sum_duplicates()  # sorted, unique indices: what is_coalesced=True promises below
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data.astype(np.float32)), coo.shape,
                                   check_invariants=False, is_coalesced=True)


@torch.no_grad()
def run_head(head: Head, x: np.ndarray, sparse=None, batch: int = 4096) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch):
        s = sparse_tensor(sparse[i:i + batch]) if sparse is not None else None
        out.append(head(torch.from_numpy(x[i:i + batch]), s).numpy())
    return np.concatenate(out).astype(np.float64)
