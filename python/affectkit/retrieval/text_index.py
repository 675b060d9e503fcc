"""TextIndex: texts with their sentence embeddings, optional label sets and scores, searchable
by meaning under a label filter (an `EmbeddingIndex` with a `labels` label-set attribute).

One file holds everything (the storage format of `affectkit.index`: versioned, checksummed,
written atomically); loading re-adds the vectors to a fresh EmbeddingIndex.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..index import EmbeddingIndex, any_of, storage

KIND = "affectkit.TextIndex"
VERSION = 1


@dataclass
class Example:
    """One stored text found by a search: its row, text, labels, scores and cosine similarity."""

    row: int
    text: str
    similarity: float
    labels: list[str] | None = None
    scores: dict[str, float] | None = None

    def as_dict(self) -> dict:
        out = {"row": self.row, "text": self.text, "similarity": round(self.similarity, 4)}
        if self.labels is not None:
            out["labels"] = self.labels
        if self.scores is not None:
            out["scores"] = {k: round(v, 4) for k, v in self.scores.items()}
        return out


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    return int(k)


class TextIndex:
    """Stored texts searchable by meaning. Build with `TextIndex.build(texts, encoder, ...)`.

    Attributes: `texts`, `encoder_name`, `label_names` and `label_matrix` ((n, L) bool; None
    without labels), `score_names` and `scores` ((n, S) float32; None without scores),
    `vectors` ((n, dim) float32, L2-normalised), `source` (free text: where the rows came from).
    """

    def __init__(self, texts, vectors, encoder_name: str, *, label_names=None, label_matrix=None,
                 score_names=None, scores=None, source: str = ""):
        texts = list(texts)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not texts:
            raise ValueError("texts: expected at least one text to index, got none")
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"vectors: expected shape ({len(texts)}, dim), got {vectors.shape}")
        self.texts = texts
        self.vectors = vectors
        self.encoder_name = encoder_name
        self.source = source
        self.label_names = None if label_names is None else [str(x) for x in label_names]
        self.label_matrix = None if label_matrix is None else np.asarray(label_matrix, dtype=bool)
        if (self.label_names is None) != (self.label_matrix is None):
            raise ValueError("label_names and label_matrix: give both or neither")
        if self.label_matrix is not None and self.label_matrix.shape != (len(texts), len(self.label_names)):
            raise ValueError(f"label_matrix: expected shape ({len(texts)}, {len(self.label_names)}), "
                             f"got {self.label_matrix.shape}")
        self.score_names = None if score_names is None else [str(x) for x in score_names]
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32).reshape(len(texts), -1)
        if self.scores is not None and self.scores.shape[1] != len(self.score_names or []):
            raise ValueError(f"scores: expected {len(self.score_names or [])} columns, got {self.scores.shape[1]}")
        self.index = EmbeddingIndex(vectors.shape[1], metric="cosine")
        attributes = None
        if self.label_matrix is not None:
            names = np.asarray(self.label_names, dtype=object)
            attributes = {"labels": [tuple(names[row]) for row in self.label_matrix]}
        self.index.add(vectors, attributes, ids=np.arange(len(texts), dtype=np.int64))

    @classmethod
    def build(cls, texts, encoder, *, labels=None, score_names=None, scores=None, source: str = "",
              progress: bool = False) -> "TextIndex":
        """Encode `texts` with `encoder` (a TextEncoder; its disk cache is used) and index them.

        labels: one sequence of label strings per text (multi-label sets; empty for none).
        scores: (n, len(score_names)) numbers kept with each text (e.g. gold valence).
        """
        from ..text.encoder import clean_texts

        texts = clean_texts(texts)
        if not texts:
            raise ValueError("texts: expected at least one text to index, got none")
        vectors = encoder.encode(texts, progress=progress)
        label_names = label_matrix = None
        if labels is not None:
            labels = [[row] if isinstance(row, str) else list(row) for row in labels]  # one label or a set
            if len(labels) != len(texts):
                raise ValueError(f"labels: expected one label set per text ({len(texts)}), got {len(labels)}")
            label_names = sorted({str(x) for row in labels for x in row})
            pos = {name: j for j, name in enumerate(label_names)}
            label_matrix = np.zeros((len(texts), len(label_names)), dtype=bool)
            for i, row in enumerate(labels):
                label_matrix[i, [pos[str(x)] for x in row]] = True
        return cls(texts, vectors, encoder.name, label_names=label_names, label_matrix=label_matrix,
                   score_names=score_names, scores=scores, source=source)

    def __len__(self) -> int:
        return len(self.texts)

    # ---- search -------------------------------------------------------------------------------
    def check_label(self, label: str) -> str:
        if self.label_names is None:
            raise ValueError(f"label: this index has no labels, so it cannot be filtered by label {label!r}")
        if label not in self.label_names:
            raise ValueError(f"label: expected one of {self.label_names}, got {label!r}")
        return label

    def _label_filter(self, label, strict: bool):
        if strict or self.label_names is None:
            self.check_label(label)
        return any_of("labels", [label])

    def search_vectors(self, vectors, k: int, labels=None, *, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine search: (similarities (n, k), rows (n, k)), -1 rows where fewer match.

        labels: None, one label every result must carry, or one label (or None) per query.
        strict: an unknown label raises ValueError; with strict=False it matches no row.
        """
        k = _check_k(k)
        vectors = np.asarray(vectors, dtype=np.float32)
        where = None
        if isinstance(labels, str):
            where = self._label_filter(labels, strict)
        elif labels is not None:
            labels = list(labels)
            if len(labels) != len(vectors):
                raise ValueError(f"labels: expected one label per query ({len(vectors)}), got {len(labels)}")
            where = [None if lab is None else self._label_filter(lab, strict) for lab in labels]
        dist, rows = self.index.search(vectors, k, where=where, mode="exact")
        return np.where(rows >= 0, 1.0 - dist, np.nan), rows

    def examples(self, sims: np.ndarray, rows: np.ndarray) -> list[list[Example]]:
        """Search results as Examples (padding dropped)."""
        return [[self.example(int(r), float(s)) for s, r in zip(srow, rrow) if r >= 0] for srow, rrow in zip(sims, rows)]

    def example(self, row: int, similarity: float) -> Example:
        labels = scores = None
        if self.label_matrix is not None:
            labels = [self.label_names[j] for j in np.flatnonzero(self.label_matrix[row])]
        if self.scores is not None:
            scores = {name: float(v) for name, v in zip(self.score_names, self.scores[row])}
        return Example(row, self.texts[row], similarity, labels, scores)

    def search(self, queries, k: int, *, encoder, labels=None, strict: bool = True) -> list[list[Example]]:
        """The k most similar stored texts for each query text (encoded with `encoder`);
        `labels` and `strict` as in `search_vectors`."""
        _check_k(k)
        if encoder.name != self.encoder_name:
            raise ValueError(f"encoder: this index was built with {self.encoder_name!r}, got {encoder.name!r}")
        return self.examples(*self.search_vectors(encoder.encode(queries), k, labels, strict=strict))

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path) -> None:
        """One file, written to a temporary name and renamed into place."""
        data = [t.encode("utf-8", "surrogatepass") for t in self.texts]
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in data], out=offsets[1:])
        arrays = {"vectors": self.vectors, "text_bytes": np.frombuffer(b"".join(data), dtype=np.uint8),
                  "text_offsets": offsets}
        if self.label_matrix is not None:
            arrays["label_matrix"] = self.label_matrix.astype(np.uint8)
        if self.scores is not None:
            arrays["scores"] = self.scores
        meta = {"kind": KIND, "version": VERSION, "encoder": self.encoder_name, "count": len(self.texts),
                "label_names": self.label_names, "score_names": self.score_names, "source": self.source}
        storage.save(path, meta, arrays)

    @classmethod
    def load(cls, path) -> "TextIndex":
        """Raises FileNotFoundError, or IndexFormatError (a ValueError) for anything unreadable."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"index file {path!r} does not exist")
        meta, arrays = storage.load(path, mmap=False, verify=True)
        if meta.get("kind") != KIND or meta.get("version") != VERSION:
            raise storage.IndexFormatError(f"{path}: not a text index ({KIND} v{VERSION}); got "
                                           f"{meta.get('kind')!r} v{meta.get('version')!r}")
        try:
            raw, off = arrays["text_bytes"].tobytes(), arrays["text_offsets"]
            texts = [raw[off[i]:off[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(off) - 1)]
            if len(texts) != meta["count"]:
                raise ValueError(f"{len(texts)} texts for {meta['count']} rows")
            return cls(texts, arrays["vectors"], meta["encoder"], label_names=meta["label_names"],
                       label_matrix=arrays.get("label_matrix"), score_names=meta["score_names"],
                       scores=arrays.get("scores"), source=meta.get("source", ""))
        except (KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError) as err:
            raise storage.IndexFormatError(f"{path}: inconsistent text index ({err})") from err
