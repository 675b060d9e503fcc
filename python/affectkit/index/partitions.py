"""Partitions: a k-means split of the stored rows (an inverted file) for filtered search.

A search scores the queries against the centroids, probes each query's nearest partitions,
and scans exactly the passing rows they hold (in the C++ scan, each partition's rows against
all of its queries at once; `probe` gives them as row groups, `as_lists` per query). Its
cost follows the passing rows in the probed partitions, not the walk a graph needs through
rows the filter rejects, so on clustered data it wins where a selective filter makes the
graph walk long and the full scan is still large (200,000 clustered 384-d rows at 10 %:
see benchmarks/RESULTS.md, twenty-sixth session).

How many partitions to probe is measured, not assumed: `calibrate` takes sample rows as
queries and records, for bands of neighbour ranks (1-10, 11-15, ..., 2,301-3,000), how often a
neighbour of that rank lies in the first p partitions probed, for every p. A filter passing a
fraction s of the rows, uncorrelated with the geometry, puts a query's j-th nearest passing
row near rank j / s, so the expected recall@k of p probes is the mean of those coverages at
ranks 1 / s, ..., k / s; `probes_for` takes the smallest p reaching RECALL. On data without
cluster structure (sentence embeddings) that p comes out high, and the planner keeps to the
scan or the graph.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .. import _C

# Neighbour ranks are calibrated in bands (1-10, 11-15, ..., 2,301-3,000), about 1.5x apart: with
# bands 3x apart, the rank of the 10th passing row at 1 % (1,017) fell in 1,001-3,000, whose
# coverage is that of rank ~2,000, and the probes doubled.
BANDS = (10, 15, 23, 35, 50, 75, 110, 160, 240, 350, 500, 750, 1100, 1600, 2300, 3000)
RECALL = 0.98  # the expected recall@k the probes must reach
_METRIC_CODES = {"ip": 0, "l2": 1, "cosine": 2}


def default_partitions(n: int) -> int:
    """About sqrt(n) partitions (447 at 200,000 rows), at least 1 and at most 4,096."""
    return int(min(4096, max(1, round(np.sqrt(max(n, 1))))))


def _knn(queries: np.ndarray, db: np.ndarray, k: int, metric: str):
    """Exact k nearest rows of db (float32 or float16) for float32 queries: (dist, rows)."""
    nq = queries.shape[0]
    k = max(1, min(k, db.shape[0]))
    out_d = np.empty((nq, k), dtype=np.float32)
    out_i = np.empty((nq, k), dtype=np.int64)
    if nq == 0 or db.shape[0] == 0:
        return out_d, np.full((nq, k), -1, dtype=np.int64)
    _C.exact_knn(_C.DEVICE_CPU, _C.DTYPE_CODES["float32"], queries.ctypes.data, nq, db.ctypes.data, db.shape[0],
                 db.shape[1], _METRIC_CODES[metric], k, out_dist=out_d.ctypes.data, out_ids=out_i.ctypes.data,
                 db_dtype=_C.DTYPE_CODES[db.dtype.name])
    return out_d, out_i


def as_lists(p: dict):
    """A probe's rows as per-query candidate lists (CSR offsets, rows) for the C++ scan."""
    starts, ends = p["group_offsets"][p["query_groups"]], p["group_offsets"][p["query_groups"] + 1]
    lens = ends - starts
    seg_end = np.cumsum(lens)
    rows = p["group_rows"][np.repeat(starts - (seg_end - lens), lens) + np.arange(int(lens.sum()))]
    offsets = np.concatenate([[0], seg_end[p["query_group_offsets"][1:] - 1]])  # every query probes >= 1
    return np.ascontiguousarray(offsets, dtype=np.int64), np.ascontiguousarray(rows, dtype=np.int64)


def _assign_metric(metric: str) -> str:
    # Unit rows (cosine) and inner products both go to the centroid of largest inner product.
    return "l2" if metric == "l2" else "ip"


class Partitions:
    """k-means centroids, the partition of every covered row, and the measured probe table."""

    def __init__(self, metric: str, centroids: np.ndarray, assignment: np.ndarray, coverage: np.ndarray):
        self.metric = metric
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.assignment = np.ascontiguousarray(assignment, dtype=np.int32)
        # coverage[b, p - 1]: how often a neighbour of a rank in band b lies in the first p partitions
        self.coverage = np.ascontiguousarray(coverage, dtype=np.float32)
        self._by_partition = None  # the covered rows ordered by partition, made at first search

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
            # Per-partition sums as one sparse product (np.add.at took ~0.4 s a round here).
            members = sparse.csr_matrix((np.ones(part.size), (part, np.arange(part.size))),
                                        shape=(count, part.size))
            sums = np.asarray(members @ sample.astype(np.float64))
            sizes = np.bincount(part, minlength=count)
            empty = sizes == 0  # reseed an empty partition on a random sample row
            sums[empty] = sample[rng.choice(sample.shape[0], int(empty.sum()))]
            sizes[empty] = 1
            centroids = sums / sizes[:, None]
            if metric == "cosine":
                centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        parts = cls(metric, centroids, np.zeros(0, dtype=np.int32), np.ones((len(BANDS), count), dtype=np.float32))
        parts.extend(vectors, n)
        parts.coverage = parts.calibrate(vectors, n, seed)
        return parts

    def extend(self, vectors: np.ndarray, n: int, chunk: int = 65_536) -> None:
        """Assign rows [rows, n) to their nearest centroid (rows added since training)."""
        new = [self.assignment]
        for start in range(self.rows, n, chunk):
            block = np.ascontiguousarray(vectors[start : min(n, start + chunk)], dtype=np.float32)
            new.append(_knn(block, self.centroids, 1, _assign_metric(self.metric))[1][:, 0].astype(np.int32))
        self.assignment = np.concatenate(new)

    def calibrate(self, vectors: np.ndarray, n: int, seed: int = 0, samples: int = 256) -> np.ndarray:
        """coverage[b, p - 1]: the fraction of sample rows' neighbours of a rank in band b that
        lie in the sample's first p partitions (sample rows as queries, themselves left out)."""
        rng = np.random.default_rng(seed + 1)
        picked = rng.choice(n, min(n, samples), replace=False)
        queries = np.ascontiguousarray(vectors[picked], dtype=np.float32)
        _, near = _knn(queries, vectors[:n], min(BANDS[-1] + 1, n), self.metric)  # the row itself first
        _, order = _knn(queries, self.centroids, self.count, _assign_metric(self.metric))
        rank = np.empty_like(order)
        rank[np.arange(len(picked))[:, None], order] = np.arange(self.count)[None, :]
        at = rank[np.arange(len(picked))[:, None], self.assignment[near[:, 1:]]]  # probe rank of each neighbour
        coverage = np.ones((len(BANDS), self.count), dtype=np.float32)
        for b, (lo, hi) in enumerate(zip((0,) + BANDS[:-1], BANDS)):
            band = at[:, lo:hi]
            if band.size:
                coverage[b] = np.cumsum(np.bincount(band.ravel(), minlength=self.count)) / band.size
        return coverage

    def probes_by_band(self, recall: float = RECALL) -> np.ndarray:
        """For each band, the probes holding `recall` of its neighbours (for reports and tests)."""
        return np.argmax(self.coverage >= recall - 1e-6, axis=1) + 1

    def probes_for(self, k: int, selectivity: float) -> int:
        """The fewest partitions whose expected recall@k reaches RECALL under a filter passing
        `selectivity` (uncorrelated with the geometry): the mean coverage of ranks j / s, j = 1..k.
        (Probes holding 97 % of the k / s nearest rows, the first rule tried, gave recall 0.927
        at 1 % on 200,000 clustered rows: the last passing neighbours lie at the far end of that
        range, where coverage is lowest.) Ranks past the last band were not calibrated: the
        probes then grow in proportion to the farthest rank. Counted as in the last band, they
        had given recall 0.74 at k = 300 and 1 % (ranks to 30,000; 81 probes)."""
        far = k / max(selectivity, 1e-9)
        ranks = np.arange(1, k + 1) / max(selectivity, 1e-9)
        bands = np.minimum(np.searchsorted(BANDS, ranks), len(BANDS) - 1)
        expected = self.coverage[bands].mean(axis=0)
        probes = int(np.argmax(expected >= RECALL - 1e-6)) + 1 if expected[-1] >= RECALL - 1e-6 else self.count
        if far > BANDS[-1]:
            probes = int(np.ceil(probes * far / BANDS[-1]))
        return min(probes, self.count)

    def probe(self, queries: np.ndarray, mask: np.ndarray | None, n: int, k: int, probes: int) -> dict:
        """What a search scans: each query's `probes` nearest partitions, and further ones until
        they hold k passing rows (up to 4 probes). As row groups for the C++ scan: the passing
        rows < n of every partition (group_offsets, group_rows: ascending within a partition)
        and each query's partitions in probe order (query_group_offsets, query_groups)."""
        nq = queries.shape[0]
        if self._by_partition is None or self._by_partition.size != self.rows:  # rows by partition
            self._by_partition = np.argsort(self.assignment, kind="stable")
        passing = self._by_partition
        if n < self.rows:
            passing = passing[passing < n]
        if mask is not None:
            passing = passing[mask[passing]]
        sizes = np.bincount(self.assignment[passing], minlength=self.count)
        how = _assign_metric(self.metric)
        probes = min(probes, self.count)
        reach = min(self.count, 4 * probes)  # partitions a query may go on to
        # The nearest `probes` centroids of every query, then `reach` of the queries holding
        # fewer than k passing rows there (a top-k over the centroids costs with its k: with
        # k = reach for all, it took 3.3 of a 9.8 ms search at 1 %).
        _, first = _knn(queries, self.centroids, probes, how)
        near = np.zeros((nq, reach), dtype=np.int64)
        near[:, :probes] = first
        short = np.flatnonzero(sizes[first].sum(axis=1) < k) if reach > probes else np.zeros(0, dtype=np.int64)
        if short.size:
            near[short] = _knn(np.ascontiguousarray(queries[short]), self.centroids, reach, how)[1]
        enough = np.cumsum(sizes[near], axis=1) >= k
        used = np.maximum(probes, np.where(enough.any(axis=1), np.argmax(enough, axis=1) + 1, reach))
        return {"group_offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                "group_rows": np.ascontiguousarray(passing, dtype=np.int64),
                "query_group_offsets": np.concatenate([[0], np.cumsum(used)]).astype(np.int64),
                "query_groups": np.ascontiguousarray(near[np.arange(reach)[None, :] < used[:, None]]),
                "mean_probes": float(used.mean()) if nq else 0.0}

    def candidates(self, queries: np.ndarray, mask: np.ndarray | None, n: int, k: int, probes: int):
        """probe()'s rows as per-query candidate lists (CSR offsets, rows), and the mean probes."""
        p = self.probe(queries, mask, n, k, probes)
        return (*as_lists(p), p["mean_probes"])

    # ---- saving -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"partition_centroids": self.centroids, "partition_assignment": self.assignment,
                "partition_coverage": self.coverage}

    @classmethod
    def from_state(cls, metric: str, arrays: dict, dim: int, n: int):
        c, a, p = (np.asarray(arrays[k]) for k in ("partition_centroids", "partition_assignment", "partition_coverage"))
        if (c.ndim != 2 or c.shape[1] != dim or c.dtype != np.float32 or a.dtype != np.int32 or a.ndim != 1
                or a.shape[0] > n or p.shape != (len(BANDS), c.shape[0]) or p.dtype != np.float32
                or (a.size and (a.min() < 0 or a.max() >= c.shape[0]))):
            raise ValueError(f"partitions: centroids {c.shape} ({c.dtype}), assignment {a.shape} ({a.dtype}) and "
                             f"coverage {p.shape} ({p.dtype}) do not fit {n} rows of dim {dim}")
        return cls(metric, c, a, p)
