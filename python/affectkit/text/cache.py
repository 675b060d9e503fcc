"""On-disk embedding cache keyed by (model id, text), so retraining never re-encodes.

Layout: <root>/embeddings/<model slug>/shard-<uuid>.npz, each holding `keys` (n, 32) uint8
SHA-256 digests of the text and `vectors` (n, dim) float32. Shards are immutable and written
to a temporary file first, then renamed into place, so an interrupted run leaves either a
complete shard or none (never a corrupt cache).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from pathlib import Path

import numpy as np

CACHE_ENV = "AFFECTKIT_CACHE"


def cache_root() -> Path:
    """$AFFECTKIT_CACHE, else ~/.cache/affectkit (outside any checkout or wheel)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "affectkit"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _slug(model_id: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[-60:]
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:12]}"


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(fileobj) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """Vectors of texts already encoded by one model (`model_id` names model and settings)."""

    def __init__(self, model_id: str, root: str | os.PathLike | None = None):
        self.model_id = model_id
        self.dir = Path(root).expanduser() if root is not None else cache_root()
        self.dir = self.dir / "embeddings" / _slug(model_id)
        self._index: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("shard-*.npz")):
            if shard.name in self._loaded:
                continue
            try:
                with np.load(shard) as z:
                    keys, vectors = z["keys"], z["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # unreadable shard (e.g. from a foreign writer): ignore, re-encode
            for k, v in zip(keys, vectors):
                self._index[k.tobytes()] = v
            self._loaded.add(shard.name)

    def __len__(self) -> int:
        self._refresh()
        return len(self._index)

    def get_many(self, keys: list[bytes]) -> list[np.ndarray | None]:
        self._refresh()
        return [self._index.get(k) for k in keys]

    def put_many(self, keys: list[bytes], vectors: np.ndarray) -> None:
        if len(keys) != len(vectors):
            raise ValueError(f"keys and vectors: expected equal lengths, got {len(keys)} and {len(vectors)}")
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = f"shard-{uuid.uuid4().hex}.npz"
        atomic_write_bytes(self.dir / name, lambda f: np.savez(f, keys=key_arr, vectors=vectors))
        for k, v in zip(keys, vectors):
            self._index[k] = v
        self._loaded.add(name)
