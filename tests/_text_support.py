"""Helpers for the text-model tests: a counting fake encoder and the shared corpora path."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared corpora not found at {SHARED}")


class CountingEncoder:
    """Stands in for a sentence-transformers model: a fixed unit vector per text; counts texts."""

    name = "counting-fake"

    def __init__(self, dim: int = 8):
        self.dim = dim
        self.texts_seen = 0
        self.calls = 0

    def encode(self, texts, **kwargs):
        self.calls += 1
        self.texts_seen += len(texts)
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)
