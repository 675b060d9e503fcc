"""Partition (inverted-file) search: candidates, calibration, planner, persistence."""

import numpy as np
import pytest

from affectkit.index import EmbeddingIndex, IndexFormatError, PlannerSettings
from affectkit.index.partitions import BANDS, Partitions

from _support import run_threads


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(gen.initial_seed()) % 2**32)


def clustered(rng, n, d, nq, clusters=40, spread=0.3):
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    q = centers[rng.integers(0, clusters, nq)] + spread * rng.standard_normal((nq, d)).astype(np.float32)
    return x, q


def recall(got, want):
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum()) for g, w in zip(got, want)]))


def true_distances(metric, q, x):
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if metric == "cosine":
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
        return 1 - q64 @ x64.T
    if metric == "ip":
        return -(q64 @ x64.T)
    return ((q64[:, None] - x64[None]) ** 2).sum(-1)


@pytest.mark.parametrize("metric,dtype", [("cosine", np.float32), ("l2", np.float32), ("ip", np.float16)])
@pytest.mark.parametrize("selectivity", [0.1, 0.5, 1.0])
def test_partition_search_finds_the_neighbours_of_clustered_rows(metric, dtype, selectivity, rng):
    x, q = clustered(rng, 5000, 24, 50)
    index = EmbeddingIndex(24, metric, dtype=dtype, partitions=60)
    ids = index.add(x, {"u": rng.random(5000)})
    index.build_partitions()
    assert index.partition_rows == 5000 and index._partitions.count == 60
    where = {"u": (0, selectivity)}
    exact = index.search(q, 10, where=where, mode="exact")
    dist, got = index.search(q, 10, where=where, mode="partition")
    assert index.explain(where, mode="partition")["probes"] >= 1
    # the probes are calibrated to hold 97 % of the neighbours on average: 0.95-1.0 on 50 queries
    assert recall(got, exact[1]) >= 0.92
    allowed = ids[np.asarray(index._table.columns["u"].values[:5000]) < selectivity]
    assert np.isin(got[got >= 0], allowed).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    stored = index._vectors[:5000].astype(np.float32)  # rounded rows (float16), normalised (cosine)
    want = true_distances(metric, q, stored)[np.arange(len(q))[:, None], np.searchsorted(ids, got)]
    np.testing.assert_allclose(dist, want, rtol=0, atol=1e-4 * (np.abs(want).max() + 1))


def test_candidates_are_the_passing_rows_of_the_nearest_partitions(rng):
    """Each query's list: its `probes` nearest partitions' passing rows, then further
    partitions until it holds k of them; checked against a numpy reference."""
    x, q = clustered(rng, 3000, 16, 40, clusters=25)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    parts = Partitions.train(x, "cosine", 37)
    cent = parts.centroids.astype(np.float64)
    for density, probes, k in [(0.3, 2, 10), (0.01, 1, 10), (1.0, 3, 5), (0.0, 2, 4)]:
        mask = rng.random(3000) < density
        offsets, rows, _ = parts.candidates(q, mask, 3000, k, probes)
        order = np.argsort(-(q.astype(np.float64) @ cent.T), axis=1, kind="stable")
        reach = min(37, 4 * probes)
        for i in range(len(q)):
            want, held = [], 0
            for j, p in enumerate(order[i, :reach]):
                if j >= probes and held >= k:
                    break
                members = np.flatnonzero((parts.assignment == p) & mask)
                want.extend(members)
                held += len(members)
            assert sorted(rows[offsets[i] : offsets[i + 1]]) == sorted(want)


def test_calibration_follows_the_data(rng):
    """Clustered rows need few probes; rows without structure need most of the partitions."""
    x, _ = clustered(rng, 6000, 32, 1, clusters=30, spread=0.2)
    noise = rng.standard_normal((6000, 32)).astype(np.float32)
    few = Partitions.train(x, "l2", 60)
    many = Partitions.train(noise, "l2", 60)
    assert few.coverage.shape == many.coverage.shape == (len(BANDS), 60)
    for parts in (few, many):  # more probes never hold fewer neighbours; all of them hold all
        assert (np.diff(parts.coverage, axis=1) >= 0).all() and np.allclose(parts.coverage[:, -1], 1)
    few_probes, many_probes = few.probes_by_band(), many.probes_by_band()
    # 200 rows a cluster: within the ranks a cluster holds, a few partitions hold the neighbours;
    # past them, and for rows without clusters, many do
    near_bands = np.asarray(BANDS) <= 100
    assert (few_probes[near_bands] <= 6).all() and few_probes[-1] > 2 * few_probes[0], few_probes
    assert (many_probes >= 20).all() and (few_probes <= many_probes).all(), (few_probes, many_probes)
    # the probes for a filter follow the ranks its passing neighbours lie at
    assert few.probes_for(10, 1.0) <= few.probes_for(10, 0.1) <= few.probes_for(10, 0.01) <= 60
    assert many.probes_for(10, 1.0) > few.probes_for(10, 1.0)


def test_ranks_past_the_calibration_widen_the_probes():
    """Ranks beyond the last calibrated band (k / s > BANDS[-1]) take probes in proportion to
    the farthest rank: counted as in the last band, k = 300 at 1 % had recall 0.74."""
    coverage = np.zeros((len(BANDS), 400), dtype=np.float32)
    coverage[:, 4:] = 1.0  # every calibrated neighbour within 5 probes
    parts = Partitions("l2", np.zeros((400, 2), np.float32), np.zeros(0, np.int32), coverage)
    assert parts.probes_for(10, 0.01) == 5  # ranks up to 1,000: calibrated
    assert parts.probes_for(30, 0.01) == 5  # up to 3,000: the last band
    assert parts.probes_for(60, 0.01) == 10  # up to 6,000: twice as far
    assert parts.probes_for(300, 0.01) == 50 and parts.probes_for(3000, 0.01) == 400  # at most all


def test_planner_weighs_partitions_by_their_calibration(rng):
    x, q = clustered(rng, 8000, 32, 100, clusters=40, spread=0.2)
    attrs = {"u": rng.random(8000)}
    index = EmbeddingIndex(32, "l2", partitions=80, graph_min_rows=1000, exact_max_rows=100)
    index.settings.exact_speedup = 1.0  # 8,000 rows are few: make a scanned row costlier
    index.add(x, attrs)
    assert index.explain({"u": (0, 0.1)})["mode"] == "exact"  # no partitions yet: never chosen
    index.build_partitions()
    plan = index.explain({"u": (0, 0.1)})
    assert plan["mode"] == "partition" and plan["probes"] >= 1 and "partition" in plan["reason"], plan
    exact = index.search(q, 10, where={"u": (0, 0.1)}, mode="exact")[1]
    assert recall(index.search(q, 10, where={"u": (0, 0.1)})[1], exact) >= 0.92  # calibrated for 0.98
    # Rows without clusters: the calibration asks for many probes, and at the default scan
    # speed the planner scans instead (the clustered index takes partitions there too)
    noise = EmbeddingIndex(32, "l2", partitions=80, graph_min_rows=1000, exact_max_rows=100)
    noise.add(rng.standard_normal((8000, 32)).astype(np.float32), attrs)
    noise.build_partitions()
    assert noise._partitions.probes_for(10, 0.1) > 4 * index._partitions.probes_for(10, 0.1)
    assert noise.explain({"u": (0, 0.1)})["mode"] == "exact"
    index.settings.exact_speedup = PlannerSettings().exact_speedup
    assert index.explain({"u": (0, 0.1)})["mode"] == "partition"


def test_partitions_cover_later_rows_and_skip_removed_ones(rng, tmp_path):
    x, q = clustered(rng, 4000, 16, 10)
    index = EmbeddingIndex(16, "cosine", partitions=30)
    index.add(x)
    index.build_partitions()
    near = index.add(q * 1.0)  # each query's own vector: its nearest row from now on
    dist, got = index.search(q, 3, mode="partition")
    assert index.partition_rows == 4010
    assert np.array_equal(got[:, 0], near)
    index.remove(near[:5])
    got = index.search(q, 3, mode="partition")[1]
    assert not np.isin(got, near[:5]).any() and np.array_equal(got[5:, 0], near[5:])


def test_partitions_survive_save_load_and_are_checked(rng, tmp_path):
    x, q = clustered(rng, 3000, 16, 20)
    index = EmbeddingIndex(16, "l2", partitions=25)
    index.add(x, {"u": rng.random(3000)})
    index.build_partitions()
    before = index.search(q, 10, where={"u": (0, 0.4)}, mode="partition")
    path = tmp_path / "p.afk"
    index.save(path)
    for mmap in (True, False):
        loaded = EmbeddingIndex.load(path, mmap=mmap)
        assert loaded.partition_rows == 3000 and loaded.partition_count == 25
        assert np.array_equal(loaded._partitions.coverage, index._partitions.coverage)
        after = loaded.search(q, 10, where={"u": (0, 0.4)}, mode="partition")
        assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    state = index._partitions.state()
    bad = dict(state, partition_assignment=np.full(3000, 25, dtype=np.int32))  # partition 25 of 0..24
    with pytest.raises(ValueError, match="partitions: centroids"):
        Partitions.from_state("l2", bad, 16, 3000)
    with pytest.raises(ValueError, match="partitions: centroids"):
        Partitions.from_state("l2", dict(state, partition_centroids=state["partition_centroids"][:, :8]), 16, 3000)
    assert issubclass(IndexFormatError, ValueError)


def test_partition_search_of_an_empty_index_pads():
    d, i = EmbeddingIndex(4).search(np.ones((3, 4), np.float32), 2, mode="partition")
    assert (i == -1).all() and np.isinf(d).all()


def test_partition_arguments_are_checked(rng):
    with pytest.raises(ValueError, match="partitions: expected a positive int or None, got 0"):
        EmbeddingIndex(8, partitions=0)
    index = EmbeddingIndex(8)
    with pytest.raises(ValueError, match="build_partitions: the index holds no rows"):
        index.build_partitions()
    index.add(rng.standard_normal((50, 8)).astype(np.float32))
    with pytest.raises(ValueError, match=r"partitions: expected an int in \[1, 50\]"):
        index.build_partitions(0)
    with pytest.raises(ValueError, match="mode: expected one of"):
        index.search(np.zeros((1, 8), np.float32), 1, mode="ivf")
    index.build_partitions(500)  # more than the rows: one a row at most
    assert index._partitions.count == 50
    d, i = index.search(np.zeros((2, 8), np.float32) + 1, 60, mode="partition")
    assert (i[:, 50:] == -1).all() and np.isinf(d[:, 50:]).all() and (i[:, :50] >= 0).all()


def test_partition_searches_race_writers_safely(rng):
    """Partition searches in threads while rows are added and removed: the added rows join
    their partitions under the write lock, and every answer is the one before the writes
    (the added rows are far from every query, and removed again)."""
    x, q = clustered(rng, 3000, 16, 20)
    index = EmbeddingIndex(16, "l2", partitions=20)
    index.add(x, {"u": rng.random(3000)})
    index.build_partitions()
    want = index.search(q, 5, where={"u": (0, 0.5)}, mode="partition")
    far = np.full((40, 16), 1e3, np.float32)

    def reader():
        for _ in range(20):
            got = index.search(q, 5, where={"u": (0, 0.5)}, mode="partition")
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])

    def writer():
        for _ in range(8):
            index.remove(index.add(far, {"u": np.zeros(40)}))

    run_threads(reader, reader, reader, writer)
    assert len(index) == 3000 and index.partition_rows <= index._n
