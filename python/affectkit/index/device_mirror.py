"""A CUDA copy of an EmbeddingIndex's stored rows, for exact search on the GPU.

The host arrays stay the index's source of truth (persistence, the graph, attribute
filters); the mirror holds the stored vectors (in the index's storage dtype) and their ids on
one CUDA device, appends the rows added since its last use, and runs the exact filtered
search there with `affectkit.ops.filtered_knn` (tensor cores for float16 rows). Filters and
tombstones become one boolean row mask per group of queries, uploaded per search (one byte
per stored row).
"""

from __future__ import annotations

import threading

import numpy as np

MAX_CUDA_K = 256  # filtered_knn's per-query list on CUDA


def parse_device(device) -> str:
    """"cpu", "cuda", "cuda:N" or a torch.device -> "cpu" or "cuda:N" (CUDA must be usable:
    built and visible). The CPU answer needs no torch."""
    if device == "cpu":
        return "cpu"
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        from .. import _C

        if not _C.build_info()["cuda_compiled"] or not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} needs a visible CUDA GPU and affectkit built with CUDA "
                             f"(cuda_compiled={_C.build_info()['cuda_compiled']}, "
                             f"torch.cuda.is_available()={torch.cuda.is_available()})")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: expected a visible CUDA device (0..{torch.cuda.device_count() - 1}), got {device!r}")
    return str(dev)


class DeviceMirror:
    def __init__(self, device: str, dim: int, dtype: np.dtype):
        import torch

        self.device = device
        self.dtype = torch.float16 if dtype == np.float16 else torch.float32
        self.vectors = torch.empty((0, dim), dtype=self.dtype, device=device)
        self.ids = torch.empty(0, dtype=torch.int64, device=device)
        self.rows = 0  # stored rows copied so far
        self._lock = threading.Lock()  # searches run concurrently; one of them copies

    def sync(self, vectors: np.ndarray, ids: np.ndarray, n: int) -> None:
        """Copy stored rows [self.rows, n) (rows are only ever appended; removals are masks)."""
        import torch

        with self._lock:
            if n > self.rows:
                self._append(torch, vectors, ids, n)

    def _append(self, torch, vectors, ids, n):
        if n > self.vectors.shape[0]:  # grow by doubling, like the host arrays
            cap = max(n, 2 * self.vectors.shape[0], 1024)
            grown = torch.empty((cap, self.vectors.shape[1]), dtype=self.dtype, device=self.device)
            grown[: self.rows] = self.vectors[: self.rows]
            grown_ids = torch.empty(cap, dtype=torch.int64, device=self.device)
            grown_ids[: self.rows] = self.ids[: self.rows]
            self.vectors, self.ids = grown, grown_ids
        new = slice(self.rows, n)
        # np.array copies: a loaded index's rows may be a read-only memory map
        self.vectors[new] = torch.from_numpy(np.array(vectors[new])).to(self.device)
        self.ids[new] = torch.from_numpy(np.array(ids[new])).to(self.device)
        self.rows = n

    def search(self, q: np.ndarray, k: int, n: int, mask: np.ndarray | None, metric: str):
        """Exact search of rows [0, n) allowed by mask: (distances float32, ids int64) numpy.

        Cosine rows and queries are already normalised by the index, so cosine is 1 + the
        inner-product distance. Ties go to the earlier stored row."""
        import torch

        from .. import ops

        queries = torch.from_numpy(q).to(self.device, self.dtype)
        allow = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[:n])).to(self.device)
        kernel_metric = "ip" if metric == "cosine" else metric
        dist, rows = ops.filtered_knn(queries, self.vectors[:n], allow, k, kernel_metric)
        if self.dtype == torch.float16 and n:
            # The kernel ranks in float32 but returns float16 distances: recompute the k
            # found ones in float32 from the float32 queries, as the CPU scan reports them.
            qf = torch.from_numpy(q).to(self.device)[:, None, :]
            found = self.vectors[rows.clamp(min=0)].float()
            if kernel_metric == "l2":
                dist = ((found - qf) ** 2).sum(-1)
            else:
                dist = -(found * qf).sum(-1)
            dist = torch.where(rows >= 0, dist, torch.inf)
        dist = dist.float()
        if metric == "cosine":
            dist = dist + 1.0
        ids = torch.where(rows >= 0, self.ids[:n][rows.clamp(min=0)] if n else rows, rows)
        return dist.cpu().numpy(), ids.cpu().numpy()
