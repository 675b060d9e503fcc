"""The training corpora as text indexes, cached on disk.

`training_index("goemotions", encoder, data)` reads the corpus from `data` (or $AFFECTKIT_DATA,
as the loaders do), encodes it (through the embedding cache) and indexes it; the result is
saved under <cache root>/index/, keyed by corpus, encoder and the SHA-256 of the corpus file,
so later calls only load it. A cache file that cannot be read is rebuilt. Corpus text is kept
in the user's cache, never in the package.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..index.storage import IndexFormatError
from ..text.cache import _slug, cache_root
from .text_index import TextIndex


@dataclass(frozen=True)
class Corpus:
    name: str  # folder name under the data root
    title: str  # for messages
    filename: str


CORPORA = {
    "goemotions": Corpus("goemotions", "GoEmotions", "train.tsv"),
    "emobank": Corpus("emobank", "EmoBank", "emobank_train_dev.csv"),
    "empathic_reactions": Corpus("empathic_reactions", "empathic reactions", "messages_train.csv"),
}
# The corpus each text model was trained on.
MODEL_CORPUS = {"text-emotion": "goemotions", "vad": "emobank", "empathy": "empathic_reactions"}


class TrainingDataMissing(FileNotFoundError):
    """The training corpus a retrieval needs is not where `data` / $AFFECTKIT_DATA points."""

    def __init__(self, corpus: Corpus, detail: str):
        self.corpus = corpus
        self.detail = detail
        super().__init__(f"nearest training examples need the {corpus.title} training data ({detail}): "
                         "pass data=DIR or set AFFECTKIT_DATA")


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"corpus: expected one of {sorted(CORPORA)}, got {name!r}")
    return CORPORA[name]


def corpus_file(name: str, data=None) -> Path:
    import os

    from ..data._io import DATA_ENV, corpus_file as find

    corpus = _corpus(name)
    if data is None and not os.environ.get(DATA_ENV):
        raise TrainingDataMissing(corpus, f"no data folder given and {DATA_ENV} is not set")
    try:
        return find(data, corpus.name, corpus.filename)
    except FileNotFoundError as err:
        raise TrainingDataMissing(corpus, str(err)) from None


def read_examples(name: str, file: Path) -> dict:
    """Training rows of a corpus file: texts plus labels (GoEmotions) or gold scores."""
    if name == "goemotions":
        from ..data import goemotions

        df = goemotions.load(file, "train")
        labels = [[goemotions.LABELS[i] for i in ids] for ids in df["labels"]]
        return {"texts": list(df["text"]), "labels": labels}
    if name == "emobank":
        from ..data import emobank

        df = emobank.load(file, "train")
        return {"texts": list(df["text"]), "score_names": list(emobank.DIMENSIONS),
                "scores": df[list(emobank.DIMENSIONS)].to_numpy(np.float32)}
    from ..data import empathic_reactions
    from ..models.training import holdout_mask

    df = empathic_reactions.load(file)
    df = df[~holdout_mask(df["message_id"])]  # the essays the `empathy` model trained on
    return {"texts": list(df["text"]), "score_names": list(empathic_reactions.TARGETS),
            "scores": df[list(empathic_reactions.TARGETS)].to_numpy(np.float32)}


def _file_digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_path(name: str, encoder_name: str, file: Path) -> Path:
    return cache_root() / "index" / f"{name}-{_slug(encoder_name)}-{_file_digest(file)}.afk"


def training_index(name: str, encoder, data=None, *, progress: bool = False) -> TextIndex:
    """The cached TextIndex of corpus `name`'s training rows, embedded with `encoder`."""
    file = corpus_file(name, data)
    path = cache_path(name, encoder.name, file)
    if path.is_file():
        try:
            index = TextIndex.load(path)
            if index.encoder_name == encoder.name:
                return index
            problem = f"built with encoder {index.encoder_name!r}"
        except (IndexFormatError, OSError) as err:
            problem = str(err)
        warnings.warn(f"rebuilding the retrieval index cache {path} ({problem})", stacklevel=2)
    rows = read_examples(name, file)
    index = TextIndex.build(rows.pop("texts"), encoder, source=f"{name}:{file.name}", progress=progress, **rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    return index


def model_training_index(model, data=None, *, progress: bool = False) -> TextIndex:
    """The training-corpus index of a text model, kept on the model per data folder."""
    kept = model.__dict__.setdefault("_training_indexes", {})
    key = str(data)
    if key not in kept:
        kept[key] = training_index(MODEL_CORPUS[model.kind], model.features.encoder, data, progress=progress)
    return kept[key]
