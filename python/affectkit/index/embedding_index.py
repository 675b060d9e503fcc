"""EmbeddingIndex: vectors + attributes + ids, searched exactly or through a graph under filters."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from .. import _C
from . import storage
from .attributes import AttributeTable
from .device_mirror import MAX_CUDA_K, DeviceMirror, parse_device
from .filters import Filter, as_filter
from .partitions import Partitions, as_lists, default_partitions
from .planner import Plan, PlannerSettings, choose

METRICS = {"ip": 0, "l2": 1, "cosine": 2}
MODES = ("auto", "exact", "approx", "partition")
STORAGE_DTYPES = ("float32", "float16")
# Partition searches score each partition's passing rows against all of its queries at once
# from this many passing rows a partition on average (a strip of the C++ kernel), else each
# query's rows on their own: on 200,000 clustered rows (447 partitions) the groups took 4.0
# against 3.3 ms at 1 % (4 rows a partition), 6.9 against 8.2 at 10 % and 21 against 31 at 50 %.
GROUP_MIN_ROWS = 12


class _ReadWriteLock:
    """Many concurrent readers (searches) or one writer (add/remove/graph build)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _as_matrix(name: str, x, dim: int, normalise: bool = False) -> np.ndarray:
    """numpy / torch / anything with __dlpack__ -> C-contiguous float32 (m, dim), finite; with
    `normalise`, a new array of the rows scaled to unit norm (zero rows stay zero). The check
    and the scaling are one C++ pass: numpy's isfinite, einsum and divide took 0.15 ms for
    1,000 x 384 queries, a fifth of a search at 0.18 % selectivity on GoEmotions."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__dlpack__") or type(x).__module__.startswith("torch"):
            import torch

            t = x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
            x = t.detach().to("cpu", torch.float32).numpy()
        elif isinstance(x, (list, tuple)):
            x = np.asarray(x, dtype=np.float32)
        else:
            raise TypeError(f"{name}: expected a numpy array, torch tensor or DLPack array, got {type(x).__name__}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a floating (or integer) array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name}: expected shape (m, {dim}), got {x.shape}")
    with np.errstate(over="ignore"):  # float64 values past float32's range become inf: refused below
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x32) if normalise else None
    bad = _C.prepare_rows(x32.ctypes.data, 0 if out is None else out.ctypes.data, x32.shape[0], dim)
    if bad >= 0:
        raise ValueError(f"{name}: expected finite values, got NaN or inf in row {bad}")
    return x32 if out is None else out


class EmbeddingIndex:
    """Filtered k-nearest-neighbour search over embeddings with attributes.

    Args:
        dim: vector dimension.
        metric: "cosine" (distance 1 - cos; vectors are normalised when added), "ip"
            (distance -<q, x>) or "l2" (squared Euclidean distance).
        dtype: storage type of the vectors: float32, or float16 (numpy or torch dtype, or its
            name). float16 halves the memory and the bytes read from the stored rows; vectors are
            rounded to float16 when added (after normalisation for cosine) and scored in
            float32 against float32 queries, so results are those of a float32 index holding
            the rounded vectors.
        M, ef_construction, ef_search: graph parameters (approximate mode). On 200,000
            clustered 384-d rows, M = 32 (64 links a node at level 0) reached the recall@10
            of M = 16 (0.973) at 1.17x its speed with half the rows allowed, and unfiltered
            0.971 at ef 32 against M = 16's 0.962 at ef 64 in 0.9x the time, for 15 % more
            build time (benchmarks/RESULTS.md, twenty-second session).
        walk_codes: keep 8-bit codes of the rows (dim bytes a row, rounded up to 64: a quarter
            of float32's memory) for graph searches to walk on; the beam they find is scored
            again on the stored rows, so returned distances are exact either way. The walk
            reads a row per node it scores, and one core gathers random rows at ~12 GB/s, so
            codes made it ~1.7x faster at the same recall@10 (200,000 x 384, 24-74 %
            selectivity, benchmarks/RESULTS.md, twenty-fourth session). Each dimension's
            range is its min and max, but for a few far rows (under 1 %), which the walk scores
            on their rows instead. False saves the memory.
        partitions: how many k-means partitions ``build_partitions`` makes (default: about
            sqrt(rows)). Once built, the planner also weighs scanning the passing rows of each
            query's nearest partitions, probed as deep as the partitions' calibration says
            (see ``partitions.py``): on 200,000 clustered 384-d rows at 10 % selectivity that
            took 7.9 ms against the exact scan's 52 (recall 0.995); on sentence embeddings the
            calibration asks for half the partitions, and the planner keeps to the scan.
        exact_max_rows, graph_min_rows: planner thresholds (see ``planner.PlannerSettings``).
        seed: seed of the graph's level draws (graph builds are deterministic).
        device: "cpu" (default) or "cuda" / "cuda:N": a CUDA index also keeps its stored rows
            on that GPU and runs exact searches there (``affectkit.ops.filtered_knn``; float16
            rows on the tensor cores, with queries rounded to float16 too); "auto" then always
            scans exactly on the GPU, "approx" still runs the graph on the CPU. Host arrays
            remain the source of truth (saving, the graph, filters); k above 256 and empty
            queries use the CPU scan.

    Thread safety: searches run concurrently (the C++ kernels release the GIL); add,
    remove and graph builds take an exclusive lock and wait for running searches.
    """

    def __init__(self, dim: int, metric: str = "cosine", dtype=np.float32, *, M: int = 32,
                 ef_construction: int = 100, ef_search: int = 32, walk_codes: bool = True,
                 exact_max_rows: int = 2_000, graph_min_rows: int = 20_000, seed: int = 0, device="cpu",
                 partitions: int | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {sorted(METRICS)}, got {metric!r}")
        try:
            storage_dtype = np.dtype(_dtype_name(dtype))
        except TypeError:
            storage_dtype = None
        if storage_dtype is None or storage_dtype.name not in STORAGE_DTYPES:
            raise TypeError(f"dtype: expected float32 or float16, got {dtype!r}")
        if not isinstance(walk_codes, (bool, np.bool_)):
            raise TypeError(f"walk_codes: expected a bool, got {walk_codes!r}")
        self.dim = int(dim)
        self.metric = metric
        self.dtype = storage_dtype
        if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, (int, np.integer))
                                       or partitions <= 0):
            raise ValueError(f"partitions: expected a positive int or None, got {partitions!r}")
        self.graph_params = {"M": int(M), "ef_construction": int(ef_construction), "seed": int(seed),
                             "walk_codes": bool(walk_codes)}
        self.partition_count = None if partitions is None else int(partitions)
        self.settings = PlannerSettings(exact_max_rows=exact_max_rows, graph_min_rows=graph_min_rows,
                                        ef=int(ef_search), M=int(M))
        self._lock = _ReadWriteLock()
        self._vectors = np.zeros((0, self.dim), dtype=self.dtype)  # capacity >= _n rows
        self._sqnorms = np.zeros(0, dtype=np.float32)  # of the stored (rounded) vectors
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._n = 0
        self._table = AttributeTable()
        self._next_id = 0
        self._graph = None
        self._partitions = None
        self._walk_codes_source = None  # saved codes the graph reads in place (load)
        self._lookup = None  # (sorted live ids, their rows), rebuilt after add/remove
        self.device = parse_device(device)
        self._mirror = DeviceMirror(self.device, self.dim, self.dtype) if self.device != "cpu" else None

    # ---- sizes --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._alive[: self._n].sum())

    @property
    def stored_ids(self) -> np.ndarray:
        """Ids of every stored row in storage order, removed ones included (for row masks)."""
        return self._ids[: self._n].copy()

    @property
    def attributes(self) -> dict:
        return {name: col.kind for name, col in self._table.columns.items()}

    # ---- mutation -----------------------------------------------------------------------------
    def add(self, vectors, attributes: dict | None = None, ids=None) -> np.ndarray:
        """Add rows; returns their int64 ids (the given ones, or fresh ones counting up)."""
        x = _as_matrix("vectors", vectors, self.dim, normalise=self.metric == "cosine")
        m = x.shape[0]
        if self.dtype != np.float32:  # norms of what is stored, so L2 distances stay consistent
            with np.errstate(over="ignore"):  # out-of-range values become inf: refused below
                rounded = x.astype(self.dtype)
            if not np.isfinite(rounded).all():
                bad = int(np.flatnonzero(~np.isfinite(rounded).all(axis=1))[0])
                raise ValueError(f"vectors: expected values within {self.dtype.name}'s range "
                                 f"(|x| <= {np.finfo(self.dtype).max}), got {float(np.abs(x[bad]).max())} in row {bad}")
            x = rounded.astype(np.float32)
        prepared = self._table.prepare(attributes, m)
        with self._lock.write():
            if ids is None:
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = np.asarray(ids)
                if new_ids.dtype.kind not in "iu" or new_ids.shape != (m,):
                    raise ValueError(f"ids: expected {m} integer ids, got dtype {new_ids.dtype} shape {new_ids.shape}")
                new_ids = new_ids.astype(np.int64)
                if m and new_ids.min() < 0:
                    raise ValueError(f"ids: expected non-negative ids (-1 marks padding), got {int(new_ids.min())}")
                if len(np.unique(new_ids)) != m:
                    raise ValueError("ids: expected distinct ids, got duplicates within the batch")
                taken = self._find_rows(new_ids)
                if (taken >= 0).any():
                    raise ValueError(f"ids: id {int(new_ids[taken >= 0][0])} is already in the index")
            self._reserve(self._n + m)
            self._vectors[self._n : self._n + m] = x
            self._sqnorms[self._n : self._n + m] = np.einsum("ij,ij->i", x, x)
            self._ids[self._n : self._n + m] = new_ids
            self._alive = np.concatenate([self._alive[: self._n], np.ones(m, dtype=bool)])
            self._table.append(prepared, m)
            self._n += m
            if m:
                self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            self._lookup = None
        return new_ids

    def _reserve(self, rows: int) -> None:
        cap = self._vectors.shape[0]
        if rows <= cap and self._vectors.flags.writeable:
            return
        new_cap = max(rows, 2 * cap, 1024)
        vec = np.empty((new_cap, self.dim), dtype=self.dtype)
        vec[: self._n] = self._vectors[: self._n]
        norms = np.empty(new_cap, dtype=np.float32)
        norms[: self._n] = self._sqnorms[: self._n]
        ids = np.empty(new_cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._vectors, self._sqnorms, self._ids = vec, norms, ids

    def remove(self, ids) -> int:
        """Remove rows by id (tombstones: every search path skips them). Unknown ids raise."""
        ids = np.asarray(ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids: expected integer ids, got dtype {ids.dtype}")
        with self._lock.write():
            rows = self._find_rows(ids.astype(np.int64))
            if (rows < 0).any():
                raise ValueError(f"ids: unknown or already removed id {int(ids[rows < 0][0])}")
            alive = self._alive.copy()  # copy-on-write: a reader's snapshot never changes
            alive[rows] = False
            self._alive = alive
            self._lookup = None
        return int(len(np.unique(rows)))

    def _find_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each live id, -1 where absent (vectorised lookup through sorted ids)."""
        if self._lookup is None:
            live = np.flatnonzero(self._alive[: self._n])
            order = np.argsort(self._ids[live], kind="stable")
            self._lookup = (self._ids[live][order], live[order])
        sorted_ids, rows = self._lookup
        pos = np.searchsorted(sorted_ids, ids)
        pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        return np.where(found, rows[pos_c] if len(rows) else -1, -1)

    # ---- graph --------------------------------------------------------------------------------
    def build_graph(self) -> None:
        """Build (or extend to every stored row) the HNSW graph used by approximate search."""
        with self._lock.write():
            self._extend_graph()

    def _extend_graph(self) -> None:
        if self._graph is None:
            self._graph = _C.HnswGraph(self.dim, METRICS[self.metric], self.graph_params["M"],
                                       self.graph_params["ef_construction"], self.graph_params["seed"],
                                       row_dtype=_C.DTYPE_CODES[self.dtype.name],
                                       walk_codes=self.graph_params["walk_codes"])
        if self._graph.size() < self._n:
            self._graph.add(self._vectors.ctypes.data, self._n - self._graph.size())

    # ---- partitions ---------------------------------------------------------------------------
    def build_partitions(self, count: int | None = None) -> None:
        """Train k-means partitions over the stored rows (count: default ``partitions`` or about
        sqrt(rows)) and calibrate their probes; rows added later join their nearest partition."""
        with self._lock.write():
            if self._n == 0:
                raise ValueError("build_partitions: the index holds no rows")
            if count is None:
                count = self.partition_count or default_partitions(self._n)
            if isinstance(count, (int, np.integer)) and not isinstance(count, bool):
                count = min(int(count), self._n)
            self._partitions = Partitions.train(self._vectors[: self._n], self.metric, count,
                                                seed=self.graph_params["seed"])
            self.partition_count = self._partitions.count

    @property
    def partition_rows(self) -> int:
        """Rows [0, partition_rows) have a partition (0 without partitions)."""
        return 0 if self._partitions is None else self._partitions.rows

    @property
    def graph_size(self) -> int:
        return 0 if self._graph is None else self._graph.size()

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries, k: int, where=None, mode: str = "auto", ef: int | None = None):
        """The k nearest live rows passing `where`, for every query.

        Args:
            queries: (nq, dim) numpy array, torch tensor or DLPack array.
            k: neighbours per query (> 0).
            where: None, a dict (``{"label": "joy", "ts": (0, 10)}``), a Filter, a boolean
                row mask (see ``stored_ids``), or a list of those with one entry per query.
            mode: "auto" (the planner picks), "exact", "approx" (graph search), or "partition"
                (the passing rows of each query's nearest partitions; built on first use).
            ef: beam width of the graph search (default: ``ef_search`` scaled down for
                selective filters, see ``PlannerSettings.ef_for``; explain() reports it).

        Returns:
            (distances float32 (nq, k), ids int64 (nq, k)) numpy arrays, ascending; ties go to
            the smaller id; missing matches are id -1 with distance +inf.
        """
        q, k, mode, filters = self._check_search(queries, k, where, mode)
        if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef <= 0):
            raise ValueError(f"ef: expected a positive int, got {ef!r}")
        nq = q.shape[0]
        groups = self._groups(filters, nq)
        plans = self._plans(groups, mode, k)
        if any(p.mode == "approx" for *_, p in plans) and self.graph_size < self._n:
            self.build_graph()
        if any(p.mode == "partition" for *_, p in plans) and self.partition_rows < self._n:
            with self._lock.write():  # rows added since the partitions were made
                if self._partitions is not None:
                    self._partitions.extend(self._vectors, self._n)
            if self._partitions is None:
                self.build_partitions()
            plans = self._plans(groups, mode, k)  # the probes come from the partitions
        if len(plans) > 1:
            out_d = np.full((nq, k), np.inf, dtype=np.float32)
            out_i = np.full((nq, k), -1, dtype=np.int64)
        with self._lock.read():
            for rows, n, mask, plan in plans:
                mask = self._current_mask(n, mask)
                qg = q if len(plans) == 1 else q[rows]  # one group holds every query, in order
                if plan.mode == "approx":
                    d, i = self._search_graph(qg, k, n, mask, int(ef) if ef is not None else plan.ef)
                elif plan.mode == "partition":
                    d, i = self._search_partitions(qg, k, n, mask, plan.probes)
                elif self._mirror is not None and k <= MAX_CUDA_K and len(rows):
                    self._mirror.sync(self._vectors, self._ids, n)
                    d, i = self._mirror.search(qg, k, n, mask, self.metric)
                else:
                    d, i = self._search_exact(qg, k, n, mask)
                if len(plans) == 1:
                    out_d, out_i = np.asarray(d, dtype=np.float32), np.asarray(i, dtype=np.int64)
                else:
                    out_d[rows], out_i[rows] = d, i
        return out_d, out_i

    def explain(self, where=None, mode: str = "auto", nq: int = 1, k: int = 10):
        """The planner's choice and its estimates: a dict, or a list of dicts for per-query filters."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        per_query = isinstance(where, list)
        filters = [as_filter(w) if w is not None else None for w in where] if per_query else as_filter_or_none(where)
        groups = self._groups(filters, len(where) if per_query else nq)
        plans = self._plans(groups, mode, k)
        out = [None] * (len(where) if per_query else 1)
        for rows, _, _, plan in plans:
            for r in rows:
                if r < len(out):
                    out[r] = plan.as_dict()
        return out if per_query else out[0]

    def _check_search(self, queries, k, where, mode):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        q = _as_matrix("queries", queries, self.dim, normalise=self.metric == "cosine")
        if isinstance(where, list):
            if len(where) != q.shape[0]:
                raise ValueError(f"where: expected one filter per query ({q.shape[0]}), got a list of {len(where)}")
            filters = [None if w is None else as_filter(w) for w in where]
        else:
            filters = as_filter_or_none(where)
        return q, int(k), mode, filters

    def _groups(self, filters, nq):
        """[(query rows, Filter or None)] with queries sharing a filter grouped together."""
        if not isinstance(filters, list):
            return [(np.arange(nq), filters)]
        by_key: dict = {}
        for i, f in enumerate(filters):
            key = None if f is None else f.key()
            by_key.setdefault(key, (f, []))[1].append(i)
        return [(np.asarray(rows), f) for f, rows in by_key.values()]

    def _plans(self, groups, mode, k: int = 10) -> list:
        """[(query rows, filter bitmask or None, Plan)] from the statistics and exact counts."""
        with self._lock.read():
            n, alive, ids = self._n, self._alive[: self._n], self._ids[: self._n]
            live = int(np.count_nonzero(alive))
            out = []
            for rows, f in groups:
                if f is None:
                    mask, est = None, 1.0
                    matching = live
                else:
                    mask = np.asarray(f.mask(self._table, ids), dtype=bool) & alive
                    est = min(1.0, max(0.0, float(f.estimate(self._table, ids))))
                    matching = int(np.count_nonzero(mask))
                plan = choose(mode, est, matching, live, self.settings, self._partitions, k)
                if self._mirror is not None and mode == "auto":
                    plan = choose("exact", est, matching, live, self.settings)
                    plan.reason = f"device {self.device}: exact scan on the GPU"
                if mask is None and live < n:
                    mask = alive.copy()
                out.append((rows, n, mask, plan))
        return out

    def _current_mask(self, n, mask):
        """Re-apply removals made between planning and searching (rows added since are excluded)."""
        alive = self._alive[:n]
        if mask is None:
            return None if alive.all() else alive.copy()
        return mask & alive

    def _search_exact(self, q, k, n, mask, row_begin=0):
        """Exact search over stored rows [row_begin, n) allowed by mask (over rows [0, n))."""
        nq = q.shape[0]
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        if nq == 0:
            return out_d, out_i
        mask_u8 = None if mask is None else np.ascontiguousarray(mask[row_begin:n], dtype=np.uint8)
        vec, norms, ids = self._vectors[row_begin:n], self._sqnorms[row_begin:n], self._ids[row_begin:n]
        _C.exact_knn(_C.DEVICE_CPU, _C.DTYPE_CODES["float32"], q.ctypes.data, nq, _addr(vec), n - row_begin,
                     self.dim, METRICS[self.metric], k,
                     mask=0 if mask_u8 is None else mask_u8.ctypes.data,
                     row_ids=_addr(ids), db_sqnorms=_addr(norms),
                     out_dist=out_d.ctypes.data, out_ids=out_i.ctypes.data,
                     db_dtype=_C.DTYPE_CODES[self.dtype.name])
        return out_d, out_i

    def _search_partitions(self, q, k, n, mask, probes):
        """Exact scan of each query's passing rows in its nearest partitions (rows [0, n))."""
        nq = q.shape[0]
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        if nq == 0 or n == 0:  # (an empty index has no partitions: all padding)
            out_d.fill(np.inf)
            out_i.fill(-1)
            return out_d, out_i
        p = self._partitions.probe(q, mask, n, k, max(1, probes))
        if p["group_rows"].size >= GROUP_MIN_ROWS * self._partitions.count:
            # Each partition's rows meet all of its queries in the shared-row-list kernel.
            scan = {"groups": self._partitions.count, "group_offsets": p["group_offsets"].ctypes.data,
                    "group_rows": _addr(p["group_rows"]), "query_group_offsets": p["query_group_offsets"].ctypes.data,
                    "query_groups": _addr(p["query_groups"])}
        else:  # a few rows a partition: each query scores its own rows
            offsets, rows = as_lists(p)
            scan = {"cand_offsets": offsets.ctypes.data, "cand_rows": _addr(rows)}
        vec, norms, ids = self._vectors[:n], self._sqnorms[:n], self._ids[:n]
        _C.exact_knn(_C.DEVICE_CPU, _C.DTYPE_CODES["float32"], q.ctypes.data, nq, _addr(vec), n, self.dim,
                     METRICS[self.metric], k, row_ids=_addr(ids), db_sqnorms=_addr(norms),
                     out_dist=out_d.ctypes.data, out_ids=out_i.ctypes.data,
                     db_dtype=_C.DTYPE_CODES[self.dtype.name], **scan)
        return out_d, out_i

    def _search_graph(self, q, k, n, mask, ef):
        """Graph search over the rows the graph covers, exact scan of rows added since, merged."""
        g = min(self.graph_size, n)
        nq = q.shape[0]
        d = np.empty((nq, k), dtype=np.float32)
        rows = np.empty((nq, k), dtype=np.int64)
        if nq == 0:
            return d, rows
        allow = None if mask is None else np.ascontiguousarray(mask[:g], dtype=np.uint8)
        self._graph.search(self._vectors.ctypes.data, q.ctypes.data, nq, k, ef,
                           allow=0 if allow is None else allow.ctypes.data,
                           out_dist=d.ctypes.data, out_rows=rows.ctypes.data)
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        if g == n:
            return d, ids
        tail_d, tail_i = self._search_exact(q, k, n, mask, row_begin=g)
        all_d, all_i = np.concatenate([d, tail_d], 1), np.concatenate([ids, tail_i], 1)
        order = np.lexsort((np.where(all_i < 0, np.iinfo(np.int64).max, all_i), all_d), axis=1)[:, :k]
        return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the index (vectors, ids, tombstones, attributes, graph) atomically to one file."""
        with self._lock.read():
            attr_meta, attr_arrays = self._table.state()
            meta = {"kind": "affectkit.EmbeddingIndex", "dim": self.dim, "metric": self.metric,
                    "dtype": self.dtype.name, "count": self._n, "next_id": self._next_id,
                    "graph_params": self.graph_params, "settings": self.settings.__dict__,
                    "attributes": attr_meta, "graph_rows": self.graph_size,
                    "partition_rows": self.partition_rows, "partitions": self.partition_count}
            arrays = {"vectors": self._vectors[: self._n], "sqnorms": self._sqnorms[: self._n],
                      "ids": self._ids[: self._n], "alive": self._alive[: self._n], **attr_arrays}
            if self._graph is not None:
                arrays["graph"] = np.frombuffer(self._graph.to_flat(), dtype=np.int32)
                codes = self._graph.walk_codes_state()
                if codes is not None:  # extra arrays: affectkit releases without codes ignore them
                    data, rows, stride, lo, step, outside = codes
                    arrays["graph_codes"] = np.frombuffer(data, dtype=np.uint8).reshape(rows, stride)
                    arrays["graph_code_lo"] = np.frombuffer(lo, dtype=np.float32)
                    arrays["graph_code_step"] = np.frombuffer(step, dtype=np.float32)
                    arrays["graph_code_outside"] = np.frombuffer(outside, dtype=np.uint8)
            if self._partitions is not None:  # extra arrays: releases without partitions ignore them
                arrays.update(self._partitions.state())
            # float32 files keep format version 1 (older affectkit reads them); float16 ones are
            # version 2, which older readers refuse instead of misreading the vectors.
            storage.save(path, meta, arrays, version=1 if self.dtype == np.float32 else 2)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True, device="cpu") -> "EmbeddingIndex":
        """Open a saved index; with mmap=True the vectors stay on disk (mapped read-only) until
        an add; device as in the constructor (a CUDA index copies its rows to the GPU)."""
        meta, arrays = storage.load(path, mmap=mmap, verify=verify)
        if meta.get("kind") != "affectkit.EmbeddingIndex":
            raise storage.IndexFormatError(f"{path}: not an EmbeddingIndex (kind {meta.get('kind')!r})")
        s = meta["settings"]
        dtype = meta.get("dtype", "float32")
        if dtype not in STORAGE_DTYPES or arrays["vectors"].dtype != np.dtype(dtype):
            raise storage.IndexFormatError(f"{path}: vectors of dtype {arrays['vectors'].dtype} do not match the "
                                           f"header's dtype {dtype!r}")
        gp = meta["graph_params"]
        index = cls(meta["dim"], meta["metric"], dtype, M=gp["M"], ef_construction=gp["ef_construction"],
                    ef_search=s["ef"], walk_codes=bool(gp.get("walk_codes", True)),
                    exact_max_rows=s["exact_max_rows"], graph_min_rows=s["graph_min_rows"],
                    seed=gp["seed"], device=device, partitions=meta.get("partitions"))
        index.settings.exact_speedup = s["exact_speedup"]
        n = meta["count"]
        index._vectors, index._sqnorms, index._ids = arrays["vectors"], arrays["sqnorms"], arrays["ids"]
        index._alive = np.array(arrays["alive"], dtype=bool)
        index._n, index._next_id = n, meta["next_id"]
        index._table = AttributeTable.from_state(meta["attributes"], arrays, n)
        for col in index._table.columns.values():  # attribute columns are small: keep them writable
            for attr in ("codes", "values", "bits"):
                if hasattr(col, attr):
                    setattr(col, attr, np.array(getattr(col, attr)))
        if "partition_centroids" in arrays:
            try:
                index._partitions = Partitions.from_state(index.metric, arrays, index.dim, n)
            except ValueError as e:
                raise storage.IndexFormatError(f"{path}: {e}") from None
        if "graph" in arrays:
            flat = np.ascontiguousarray(arrays["graph"], dtype=np.int32)
            index._graph = _C.HnswGraph.from_flat(flat.ctypes.data, flat.size)
            if index._graph.row_dtype() != _C.DTYPE_CODES[dtype]:
                raise storage.IndexFormatError(f"{path}: the graph was built over rows of another dtype than {dtype!r}")
            if index.graph_params["walk_codes"]:
                index._load_walk_codes(path, arrays)
        return index

    def _load_walk_codes(self, path, arrays) -> None:
        """The saved walk codes, checked; a file saved before codes existed has them made here."""
        names = ("graph_codes", "graph_code_lo", "graph_code_step", "graph_code_outside")
        if not all(name in arrays for name in names):
            self._graph.code_walk(self._vectors.ctypes.data)
            return
        codes, lo, step, outside = (np.ascontiguousarray(arrays[name]) for name in names)
        n, stride = self._graph.size(), (self.dim + 63) // 64 * 64
        if (codes.dtype != np.uint8 or codes.shape != (n, stride) or outside.dtype != np.uint8
                or outside.shape != (n,) or lo.dtype != np.float32 or step.dtype != np.float32
                or lo.shape != (self.dim,) or step.shape != (self.dim,)):
            raise storage.IndexFormatError(
                f"{path}: walk codes of shape {codes.shape} ({codes.dtype}), outside {outside.shape}, lo {lo.shape} "
                f"and step {step.shape} do not fit a graph of {n} rows of dim {self.dim} (expected ({n}, {stride}) "
                f"and ({n},) uint8, ({self.dim},) float32)")
        # In place (a memory-mapped file stays mapped; the 64-byte aligned layout of saved
        # arrays allows it): kept alive here, copied by the graph's next add.
        self._graph.set_walk_codes(_addr(codes), n, lo.ctypes.data, step.ctypes.data, _addr(outside), view=True)
        self._walk_codes_source = codes


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data if a.size else 0


def as_filter_or_none(where):
    return None if where is None else as_filter(where)


def _dtype_name(dtype):
    try:
        import torch

        if isinstance(dtype, torch.dtype):
            return str(dtype).removeprefix("torch.")
    except ImportError:  # pragma: no cover
        pass
    return dtype
