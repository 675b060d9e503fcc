"""Partitions: a k-means split of the stored rows (an inverted file) for filtered search.

A search scores the queries against the centroids, probes each query's nearest partitions,
and scans exactly the passing rows they hold (per-query candidate lists in the C++ scan). Its
cost follows the passing rows in the probed partitions, not the walk a graph needs through
rows the filter rejects, so on clustered data it wins where a selective filter makes the
graph walk long and the full scan is still large (200,000 clustered 384-d rows at 10 %:
see benchmarks/RESULTS.md, twenty-sixth session).

How many partitions to probe is measured, not assumed: `calibrate` takes sample rows as
queries and finds, for each depth K (the K nearest rows), the probes that cover a target
fraction of those rows. A filter passing a fraction s of the rows, uncorrelated with the
geometry, puts a query's k nearest passing rows among its about k / s nearest rows, so the
probes for (k, s) are those for K = k / s. On data without cluster structure (sentence
embeddings) the measured probes come out high and the planner keeps to the scan or the graph.
"""

from __future__ import annotations

import numpy as np

from .. import _C

DEPTHS = (10, 30, 100, 300, 1000)  # neighbour depths K the calibration measures probes for
COVERAGE = 0.97  # fraction of the K nearest rows the probes must hold, averaged over samples
_METRIC_CODES = {"ip": 0, "l2": 1, "cosine": 2}


def default_partitions(n: int) -> int:
    """About sqrt(n) partitions (447 at 200,000 rows), at least 1 and at most 4,096."""
    return int(min(4096, max(1, round(np.sqrt(max(n, 1))))))


def _knn(queries: np.ndarray, db: np.ndarray, k: int, metric: str, cand=None):
    """Exact k nearest rows of db (float32 or float16) for float32 queries: (dist, rows)."""
    nq = queries.shape[0]
    k = max(1, min(k, db.shape[0]))
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    if nq == 0 or db.shape[0] == 0:
        return out_d, np.full((nq, k), -1, dtype=np.int64)
    extra = {}
    if cand is not None:
        offsets, rows = cand
        extra = {"cand_offsets": offsets.ctypes.data, "cand_rows": rows.ctypes.data if rows.size else 0}
    _C.exact_knn(_C.DEVICE_CPU, _C.DTYPE_CODES["float32"], queries.ctypes.data, nq, db.ctypes.data, db.shape[0],
                 db.shape[1], _METRIC_CODES[metric], k, out_dist=out_d.ctypes.data, out_ids=out_i.ctypes.data,
                 db_dtype=_C.DTYPE_CODES[db.dtype.name], **extra)
    return out_d, out_i


def _assign_metric(metric: str) -> str:
    # Unit rows (cosine) and inner products both go to the centroid of largest inner product.
    return "l2" if metric == "l2" else "ip"


class Partitions:
    """k-means centroids, the partition of every covered row, and the measured probe table."""

    def __init__(self, metric: str, centroids: np.ndarray, assignment: np.ndarray, probes: np.ndarray):
        self.metric = metric
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.assignment = np.ascontiguousarray(assignment, dtype=np.int32)
        self.probes = np.asarray(probes, dtype=np.int64)  # probes for each of DEPTHS

    @property
    def count(self) -> int:
        return self.centroids.shape[0]

    @property
    def rows(self) -> int:
        """Rows [0, rows) of the index have a partition."""
        return self.assignment.shape[0]

    # ---- building -----------------------------------------------------------------------------
    @classmethod
    def train(cls, vectors: np.ndarray, metric: str, count: int, seed: int = 0, iterations: int = 10):
        """k-means (Lloyd) on up to 64 rows a partition, then every row assigned and calibrated."""
        n = vectors.shape[0]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= max(n, 1):
            raise ValueError(f"partitions: expected an int in [1, {max(n, 1)}] (the stored rows), got {count!r}")
        rng = np.random.default_rng(seed)
        sample = np.asarray(vectors[np.sort(rng.choice(n, min(n, 64 * count), replace=False))], dtype=np.float32)
        centroids = sample[rng.choice(sample.shape[0], count, replace=False)].copy()
        how = _assign_metric(metric)
        for _ in range(iterations):
            part = _knn(sample, centroids, 1, how)[1][:, 0]
            sums = np.zeros_like(centroids, dtype=np.float64)
            np.add.at(sums, part, sample)
            sizes = np.bincount(part, minlength=count)
            empty = sizes == 0  # reseed an empty partition on a random sample row
            sums[empty] = sample[rng.choice(sample.shape[0], int(empty.sum()))]
            sizes[empty] = 1
            centroids = sums / sizes[:, None]
            if metric == "cosine":
                centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        parts = cls(metric, centroids, np.zeros(0, dtype=np.int32), np.zeros(len(DEPTHS), dtype=np.int64))
        parts.extend(vectors, n)
        parts.probes = parts.calibrate(vectors, n, seed)
        return parts

    def extend(self, vectors: np.ndarray, n: int, chunk: int = 65_536) -> None:
        """Assign rows [rows, n) to their nearest centroid (rows added since training)."""
        new = [self.assignment]
        for start in range(self.rows, n, chunk):
            block = np.ascontiguousarray(vectors[start : min(n, start + chunk)], dtype=np.float32)
            new.append(_knn(block, self.centroids, 1, _assign_metric(self.metric))[1][:, 0].astype(np.int32))
        self.assignment = np.concatenate(new)

    def calibrate(self, vectors: np.ndarray, n: int, seed: int = 0, samples: int = 256) -> np.ndarray:
        """Probes needed to hold COVERAGE of the K nearest rows, for each K in DEPTHS."""
        rng = np.random.default_rng(seed + 1)
        picked = rng.choice(n, min(n, samples), replace=False)
        queries = np.ascontiguousarray(vectors[picked], dtype=np.float32)
        depth = min(DEPTHS[-1] + 1, n)
        _, near = _knn(queries, vectors[:n], depth, self.metric)  # (the row itself comes first)
        _, order = _knn(queries, self.centroids, self.count, _assign_metric(self.metric))
        rank = np.empty_like(order)
        rank[np.arange(len(picked))[:, None], order] = np.arange(self.count)[None, :]
        probes = []
        for K in DEPTHS:
            cols = near[:, 1 : K + 1]
            if cols.shape[1] == 0:
                probes.append(1)
                continue
            at = rank[np.arange(len(picked))[:, None], self.assignment[cols]]  # probe rank of each near row
            covered = np.cumsum(np.bincount(at.ravel(), minlength=self.count)) / at.size  # by 1, 2, ... probes
            probes.append(int(np.argmax(covered >= COVERAGE - 1e-12)) + 1)
        return np.asarray(probes, dtype=np.int64)

    # ---- searching ----------------------------------------------------------------------------
    def probes_for(self, k: int, selectivity: float) -> int:
        """Partitions to probe for k neighbours under a filter passing `selectivity`."""
        depth = min(DEPTHS[-1], max(DEPTHS[0], k / max(selectivity, 1e-9)))
        p = np.interp(np.log(depth), np.log(DEPTHS), self.probes.astype(np.float64))
        return int(min(self.count, max(1, np.ceil(p))))

    def candidates(self, queries: np.ndarray, mask: np.ndarray | None, n: int, k: int, probes: int):
        """Per-query candidate rows (CSR offsets, rows): the passing rows < n of each query's
        `probes` nearest partitions, and of further ones until k passing rows are held."""
        nq = queries.shape[0]
        passing = np.arange(n) if mask is None else np.flatnonzero(mask[:n])
        part = self.assignment[passing]
        order = np.argsort(part, kind="stable")
        passing = passing[order]
        sizes = np.bincount(part, minlength=self.count)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        reach = min(self.count, max(probes, 4 * probes))  # partitions a query may go on to
        _, near = _knn(queries, self.centroids, reach, _assign_metric(self.metric))
        held = np.cumsum(sizes[near], axis=1)
        enough = held >= k
        more = np.where(enough.any(axis=1), np.argmax(enough, axis=1) + 1, reach)
        used = np.maximum(probes, more)  # partitions probed per query
        lens = np.where(np.arange(reach)[None, :] < used[:, None], sizes[near], 0).ravel()
        seg_start = starts[near].ravel()
        seg_end = np.cumsum(lens)
        total = int(seg_end[-1]) if lens.size else 0
        rows = passing[np.repeat(seg_start - (seg_end - lens), lens) + np.arange(total)]
        offsets = np.concatenate([[0], seg_end[reach - 1 :: reach]]).astype(np.int64)
        return np.ascontiguousarray(offsets), np.ascontiguousarray(rows, dtype=np.int64), float(used.mean())

    # ---- saving -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"partition_centroids": self.centroids, "partition_assignment": self.assignment,
                "partition_probes": self.probes}

    @classmethod
    def from_state(cls, metric: str, arrays: dict, dim: int, n: int):
        c, a, p = (np.asarray(arrays[k]) for k in ("partition_centroids", "partition_assignment", "partition_probes"))
        if (c.ndim != 2 or c.shape[1] != dim or c.dtype != np.float32 or a.dtype != np.int32 or a.ndim != 1
                or a.shape[0] > n or p.shape != (len(DEPTHS),) or (a.size and (a.min() < 0 or a.max() >= c.shape[0]))):
            raise ValueError(f"partitions: centroids {c.shape} ({c.dtype}), assignment {a.shape} ({a.dtype}) and "
                             f"probes {p.shape} do not fit {n} rows of dim {dim}")
        return cls(metric, c, a, p)
