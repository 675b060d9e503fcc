"""Finding corpus files and reading them with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

DATA_ENV = "AFFECTKIT_DATA"


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The folder holding one sub-folder per corpus: `path`, else $AFFECTKIT_DATA."""
    if path is None:
        path = os.environ.get(DATA_ENV)
        if not path:
            raise FileNotFoundError(
                f"no data folder given: pass path=... or set {DATA_ENV} to the folder that holds "
                "goemotions/, meld/, emobank/, empathic_reactions/"
            )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    return root


def corpus_file(path, corpus: str, filename: str) -> Path:
    """`path` may be the data root, the corpus folder, or the file itself."""
    base = data_root(path) if path is None else Path(path).expanduser()
    if base.is_file():
        return base
    for candidate in (base / filename, base / corpus / filename):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{corpus}: no {filename} in {str(base)!r} or {str(base / corpus)!r}")


def read_table(file: Path, required: list[str], **kwargs) -> pd.DataFrame:
    """Read a CSV/TSV, failing with the file's name when it is not what we expect."""
    try:
        df = pd.read_csv(file, **kwargs)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except pd.errors.ParserError as err:
        raise ValueError(f"{file}: not a readable table ({err})") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing}; found {list(df.columns)}")
    return df
