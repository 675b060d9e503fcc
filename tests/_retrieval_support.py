"""Helpers for the retrieval tests: small fake corpora in the real file formats, a fake encoder."""

import csv

import numpy as np
import torch
from _text_support import CountingEncoder

from affectkit.data import goemotions
from affectkit.text import TextEncoder


def rng_from(gen: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def random_texts(rng, n: int) -> list[str]:
    """Distinct short texts ("w17 w3 w40 #12"): the fake encoder gives each its own vector."""
    return [" ".join(f"w{w}" for w in rng.integers(0, 60, size=rng.integers(2, 7))) + f" #{i}" for i in range(n)]


def write_goemotions(root, rng, n: int = 300, split: str = "train") -> tuple[list[str], list[tuple[int, ...]]]:
    """root/goemotions/{split}.tsv with n random comments, 1-3 random labels each (every label used)."""
    texts = random_texts(rng, n)
    labels = [tuple(sorted(set(rng.integers(0, len(goemotions.LABELS), size=rng.integers(1, 4)).tolist())))
              for _ in range(n)]
    for j in range(len(goemotions.LABELS)):  # every label carried by at least one comment
        labels[j] = tuple(sorted(set(labels[j]) | {j}))
    folder = root / "goemotions"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.tsv", "w", encoding="utf-8") as f:
        for i, (t, ls) in enumerate(zip(texts, labels)):
            f.write(f"{t}\t{','.join(map(str, ls))}\tid{i}\n")
    return texts, labels


def write_emobank(root, rng, n: int = 120, n_dev: int = 5) -> tuple[list[str], np.ndarray]:
    """root/emobank/emobank_train_dev.csv: n train rows and n_dev dev rows with random V, A, D."""
    texts = random_texts(rng, n + n_dev)
    vad = np.round(rng.uniform(1, 5, size=(n + n_dev, 3)), 2)
    folder = root / "emobank"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "emobank_train_dev.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "V", "A", "D", "text"])
        for i, (t, row) in enumerate(zip(texts, vad)):
            w.writerow([f"e{i}", "train" if i < n else "dev", *row, t])
    return texts[:n], vad[:n]


def fake_encoder(cache_root, dim: int = 384) -> TextEncoder:
    return TextEncoder(CountingEncoder(dim), cache_root=cache_root)


def brute_force(encoder: TextEncoder, corpus: list[str], query: str, allowed=None, k: int = 3):
    """(rows, similarities) of the k most cosine-similar corpus texts among `allowed` rows."""
    x = encoder.model.encode(corpus).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = encoder.model.encode([query])[0].astype(np.float64)
    q /= np.linalg.norm(q)
    sims = x @ q
    rows = np.arange(len(corpus)) if allowed is None else np.flatnonzero(allowed)
    order = rows[np.argsort(-sims[rows], kind="stable")][:k]
    return order.tolist(), sims[order]
