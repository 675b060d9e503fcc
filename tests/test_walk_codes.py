"""The graph walk's 8-bit row codes (csrc/knn/walk_codes.h): coding, their distance kernels
against a float64 reference, following rows added later, persistence, and what searches
return with them (recall kept, distances exact)."""

import numpy as np
import pytest

import affectkit._C as C
from _support import numpy_rng
from affectkit.index import EmbeddingIndex, IndexFormatError
from affectkit.index import storage

METRIC_CODES = {"ip": 0, "l2": 1, "cosine": 2}


@pytest.fixture
def rng(gen):
    return numpy_rng(gen)


def clustered(rng, n, d, nq, clusters=30, scale=1.0, shift=0.0):
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    q = centers[rng.integers(0, clusters, nq)] + 0.4 * rng.standard_normal((nq, d)).astype(np.float32)
    return (x * scale + shift).astype(np.float32), (q * scale + shift).astype(np.float32)


def codes_of(graph):
    """(codes, lo, step, outside flags) as arrays."""
    data, rows, stride, lo, step, outside = graph.walk_codes_state()
    codes = np.frombuffer(data, np.uint8).reshape(rows, stride)
    return codes, np.frombuffer(lo, np.float32), np.frombuffer(step, np.float32), np.frombuffer(outside, np.uint8)


def graph_over(x, metric="l2", dtype="float32", M=8):
    rows = np.ascontiguousarray(x.astype(dtype))
    g = C.HnswGraph(x.shape[1], METRIC_CODES[metric], M, 40, 0, row_dtype=C.DTYPE_CODES[dtype])
    g.add(rows.ctypes.data, len(rows))
    return g, rows


def assert_codes_decode(codes, lo, step, x):
    """Every stored value within half a step of its code's value; padding zero."""
    d = x.shape[1]
    assert codes.shape[1] == (d + 63) // 64 * 64 and not codes[:, d:].any()
    decoded = lo.astype(np.float64) + step.astype(np.float64) * codes[:, :d]
    err = np.abs(decoded - x.astype(np.float64))
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6 * (np.abs(x) + 1)).all(), err.max()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("d", [1, 5, 64, 70])
def test_codes_decode_within_half_a_step(d, dtype, rng):
    x, _ = clustered(rng, 257, d, 1, scale=3.0, shift=-1.0)
    g, rows = graph_over(x, dtype=dtype)
    codes, lo, step, outside = codes_of(g)
    assert codes.shape[0] == 257 and not outside.any()
    stored = rows.astype(np.float32)
    # few rows: the 0.1 / 99.9 % quantiles are the extremes, so the ranges are the exact ones
    np.testing.assert_array_equal(lo, stored.min(0))
    np.testing.assert_allclose(lo + 255 * step, stored.max(0), rtol=1e-5, atol=1e-6)
    assert (codes[:, :d].min(0) == 0).all() and (codes[:, :d].max(0)[step > 0] == 255).all()
    assert_codes_decode(codes, lo, step, stored)


def test_far_rows_are_marked_not_stretched_over(rng):
    """A few far rows do not widen the ranges (that cost the other rows their precision): they
    are marked for the walk to score on their rows."""
    d = 16
    x, _ = clustered(rng, 5000, d, 1)
    far = rng.choice(5000, 3, replace=False)
    x[far] *= 1000.0
    g, rows = graph_over(x)
    codes, lo, step, outside = codes_of(g)
    assert set(np.flatnonzero(outside)) == set(far)
    normal = np.setdiff1d(np.arange(5000), far)
    assert (lo + 255 * step < np.abs(x[far]).max(0)).all()  # the far values lie past the ranges
    # the ranges: about the normal rows' 1-99 % spread, widened by itself on each side (the
    # far rows shift the sample's quantiles by a rank or two), nothing like the far rows' span
    q_lo, q_hi = np.quantile(x[normal], [0.01, 0.99], axis=0)
    assert (255 * step <= 3.3 * (q_hi - q_lo)).all()
    inside = ~outside.astype(bool)
    assert_codes_decode(codes[inside], lo, step, x[inside])
    # the walk scores the far rows on their rows, the others on their codes
    q = np.ascontiguousarray(x[far[0]] * 0.9)
    nodes = np.concatenate([far, normal[:20]]).astype(np.int32)
    out = np.empty(len(nodes), np.float32)
    g.walk_distances(rows.ctypes.data, q.ctypes.data, nodes.ctypes.data, len(nodes), out.ctypes.data)
    exact = ((x[nodes].astype(np.float64) - q) ** 2).sum(1)
    np.testing.assert_allclose(out[:3], exact[:3], rtol=1e-5)
    decoded = lo.astype(np.float64) + step.astype(np.float64) * codes[normal[:20], :d]
    np.testing.assert_allclose(out[3:], ((decoded - q) ** 2).sum(1), rtol=1e-4)


def test_many_far_rows_are_no_outliers(rng):
    """3 % of the rows far out: more than the 1 % the walk would score on their rows, so the
    ranges become the rows' min and max and nothing is outside."""
    x, _ = clustered(rng, 6000, 16, 1)
    x[rng.choice(6000, 180, replace=False)] *= 1000.0
    g, rows = graph_over(x)
    codes, lo, step, outside = codes_of(g)
    assert not outside.any()
    np.testing.assert_array_equal(lo, x.min(0))
    assert_codes_decode(codes, lo, step, x)


def test_ranges_follow_rows_added_later(rng):
    d = 24
    first, _ = clustered(rng, 3000, d, 1)
    inside = first[rng.integers(0, 3000, 50)] * 0.5  # within the first rows' ranges
    far = first[:5] * 200.0                           # a few far rows
    drift, _ = clustered(rng, 300, d, 1, scale=4.0, shift=3.0)  # 9 % of the rows, elsewhere
    table = np.ascontiguousarray(np.concatenate([first, inside, far, drift]))
    g = C.HnswGraph(d, 1, 8, 40, 0)
    g.add(table.ctypes.data, 3000)
    before, lo0, step0, _ = (np.array(a) for a in codes_of(g))
    g.add(table.ctypes.data, 55)
    codes, lo, step, outside = codes_of(g)
    # rows within the ranges, and the five far ones (under 1 %), are coded on their own: the
    # ranges and older codes stay, the far rows are marked
    np.testing.assert_array_equal(lo, lo0)
    np.testing.assert_array_equal(step, step0)
    np.testing.assert_array_equal(codes[:3000], before)
    assert list(np.flatnonzero(outside)) == list(range(3050, 3055))
    assert_codes_decode(codes[:3050], lo, step, table[:3050])
    g.add(table.ctypes.data, 300)
    codes, lo, step, outside = codes_of(g)
    # past 1 % outside: the ranges are derived again from every row, and all coded again
    assert codes.shape[0] == 3355 and outside[3050:3055].all() and outside.sum() <= 33  # 1 %
    assert (lo + 255 * step > table[:3000].max(0) + 1.0).any()
    inside = ~outside.astype(bool)
    assert_codes_decode(codes[inside], lo, step, table[inside])


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("d", [3, 64, 100])
def test_walk_distances_match_the_decoded_rows_in_float64(metric, d, rng):
    """The walk's kernels (the widest the CPU runs; test_simd_levels.py reruns this file at
    the lower levels) against the float64 distance to the rows the codes stand for."""
    x, q = clustered(rng, 200, d, 7, scale=2.0)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    g, rows = graph_over(x, metric)
    codes, lo, step, outside = codes_of(g)
    assert not outside.any()
    decoded = lo.astype(np.float64) + step.astype(np.float64) * codes[:, :d]
    nodes = np.concatenate([rng.permutation(200)[:61], [0, 199]]).astype(np.int32)
    out = np.full(len(nodes), np.nan, np.float32)
    for qi in np.ascontiguousarray(q):
        g.walk_distances(rows.ctypes.data, qi.ctypes.data, nodes.ctypes.data, len(nodes), out.ctypes.data)
        rowsd, q64 = decoded[nodes], qi.astype(np.float64)
        want = {"ip": -(rowsd @ q64), "cosine": 1 - rowsd @ q64, "l2": ((rowsd - q64) ** 2).sum(1)}[metric]
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5 * (np.abs(want).max() + 1))


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_walking_on_codes_keeps_recall_and_returns_exact_distances(metric, rng):
    x, q = clustered(rng, 3000, 48, 60)
    labels = rng.choice(["a", "b", "c"], 3000, p=[0.5, 0.3, 0.2])
    results = {}
    for codes in (True, False):
        index = EmbeddingIndex(48, metric, M=10, ef_construction=60, walk_codes=codes)
        index.add(x, {"label": labels})
        index.build_graph()
        assert index._graph.has_walk_codes() is codes
        results[codes] = index
    for where in (None, {"label": "a"}, {"label": ["b", "c"]}):
        exact = results[True].search(q, 10, where=where, mode="exact")
        got = {c: ix.search(q, 10, where=where, mode="approx", ef=24) for c, ix in results.items()}
        r = {c: np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got[c][1], exact[1])]) for c in got}
        assert r[True] >= 0.9 and r[True] >= r[False] - 0.03, r
        # distances are the rows' own (the beam is scored again), as the exact search gives
        # them up to float32 rounding (l2 there is |q|^2 + |x|^2 - 2 q.x); code distances are
        # off by ~1e-3 of the range
        same = got[True][1] == exact[1]
        np.testing.assert_allclose(got[True][0][same], exact[0][same], rtol=2e-5,
                                   atol=2e-5 * np.abs(exact[0][same]).max())
        assert (np.diff(got[True][0], axis=1) >= 0).all()


@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_a_far_row_keeps_the_walk_s_recall(scale, rng):
    """One row far out in every dimension: with min-max ranges it took the other rows'
    precision, and recall@10 from 0.985 to 0.889 (x100) and 0.118 (x10^4)."""
    x, q = clustered(rng, 6000, 32, 80)
    x[17] *= scale
    got = {}
    for codes in (True, False):
        index = EmbeddingIndex(32, "l2", M=12, ef_construction=60, walk_codes=codes)
        index.add(x)
        index.build_graph()
        exact = index.search(q, 10, mode="exact")[1]
        approx = index.search(q, 10, mode="approx", ef=32)[1]
        got[codes] = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert got[True] >= got[False] - 0.02 and got[True] >= 0.9, got


def test_queries_near_far_rows_find_them(rng):
    """Far rows are scored on their rows during the walk: their clamped codes would put them
    at the range's edge, among thousands of ordinary rows. (Isolated far rows are hard for the
    graph itself: at ef 32 it found 35-90 % of them with or without codes, hence ef 128.)"""
    x, _ = clustered(rng, 6000, 32, 1)
    far = rng.choice(6000, 20, replace=False)  # 0.3 % of the rows: they stay outside
    x[far] = x[far] * 50.0 + 200.0
    # each query's nearest row is its far row, by far (the next ones are far in every sense)
    q = x[far] + 0.5 * rng.standard_normal((20, 32)).astype(np.float32)
    found = {}
    for codes in (True, False):
        index = EmbeddingIndex(32, "l2", M=12, ef_construction=60, walk_codes=codes)
        index.add(x)
        index.build_graph()
        assert (index.search(q, 1, mode="exact")[1][:, 0] == index.stored_ids[far]).all()
        found[codes] = (index.search(q, 1, mode="approx", ef=128)[1][:, 0] == index.stored_ids[far]).mean()
        if codes:
            assert set(np.flatnonzero(codes_of(index._graph)[3])) == set(far)
    assert found[True] >= 0.5 and found[True] >= found[False] - 0.05, found


def test_save_load_keeps_the_codes_and_old_files_get_them(tmp_path, rng):
    x, q = clustered(rng, 2500, 20, 30)
    x[:3] *= 1000.0  # three rows outside the codes' ranges: their marks are saved too
    index = EmbeddingIndex(20, "l2", M=8, ef_construction=40)
    index.add(x, {"t": rng.random(2500)})
    index.build_graph()
    where = {"t": (0.0, 0.6)}
    before = index.search(q, 10, where=where, mode="approx")
    path = tmp_path / "codes.afk"
    index.save(path)
    meta, arrays = storage.load(path, mmap=False)
    assert arrays["graph_codes"].shape == (2500, 64) and list(np.flatnonzero(arrays["graph_code_outside"])) == [0, 1, 2]
    assert meta["graph_params"]["walk_codes"] is True
    for mmap in (True, False):
        loaded = EmbeddingIndex.load(path, mmap=mmap)
        # a mapped file's codes are read where they lie (saved arrays are 64-byte aligned)
        if mmap:
            assert loaded._graph.walk_codes_in_place()
        for a, b in zip(codes_of(loaded._graph), codes_of(index._graph)):
            np.testing.assert_array_equal(a, b)
        after = loaded.search(q, 10, where=where, mode="approx")
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_array_equal(after[0], before[0])
    # rows added to a mapped index: the codes are copied before they grow, and stay right
    loaded = EmbeddingIndex.load(path, mmap=True)
    more, _ = clustered(rng, 300, 20, 1)
    loaded.add(more, {"t": rng.random(300)})
    loaded.build_graph()
    assert not loaded._graph.walk_codes_in_place()
    codes, lo, step, outside = codes_of(loaded._graph)
    np.testing.assert_array_equal(codes[:2500], codes_of(index._graph)[0])
    stored = loaded._vectors[: loaded._n]
    inside = ~outside.astype(bool)
    assert_codes_decode(codes[inside], lo, step, stored[inside])
    # a file from before walk codes (no code arrays, no walk_codes parameter) gets them at load
    old = tmp_path / "old.afk"
    del meta["graph_params"]["walk_codes"]
    storage.save(old, meta, {k: v for k, v in arrays.items() if not k.startswith("graph_code")})
    loaded = EmbeddingIndex.load(old)
    assert loaded._graph.has_walk_codes()
    for a, b in zip(codes_of(loaded._graph), codes_of(index._graph)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.search(q, 10, where=where, mode="approx")[1], before[1])


def test_without_codes_nothing_is_coded_or_saved(tmp_path, rng):
    x, q = clustered(rng, 1200, 16, 10)
    index = EmbeddingIndex(16, "cosine", M=8, ef_construction=40, walk_codes=False)
    index.add(x)
    index.build_graph()
    assert not index._graph.has_walk_codes() and index._graph.walk_codes_state() is None
    path = tmp_path / "plain.afk"
    index.save(path)
    assert not any(k.startswith("graph_code") for k in storage.load(path, mmap=False)[1])
    loaded = EmbeddingIndex.load(path)
    assert not loaded._graph.has_walk_codes() and loaded.graph_params["walk_codes"] is False
    np.testing.assert_array_equal(loaded.search(q, 5, mode="approx")[1], index.search(q, 5, mode="approx")[1])


def test_bad_codes_and_settings_raise_clear_errors(tmp_path, rng):
    with pytest.raises(TypeError, match="walk_codes: expected a bool"):
        EmbeddingIndex(8, walk_codes="yes")
    x, _ = clustered(rng, 300, 8, 1)
    g, rows = graph_over(x)
    codes, lo, step, outside = (np.array(a) for a in codes_of(g))
    with pytest.raises(ValueError, match="one code row per graph node"):
        g.set_walk_codes(codes.ctypes.data, 299, lo.ctypes.data, step.ctypes.data, outside.ctypes.data)
    bad_step = step.copy()
    bad_step[3] = np.nan
    with pytest.raises(ValueError, match="finite lo and step"):
        g.set_walk_codes(codes.ctypes.data, 300, lo.ctypes.data, bad_step.ctypes.data, outside.ctypes.data)
    with pytest.raises(ValueError, match="outside"):
        g.set_walk_codes(codes.ctypes.data, 300, lo.ctypes.data, step.ctypes.data, 0)
    # the same codes: accepted; in place only where 64-byte aligned (the kernels' loads)
    g.set_walk_codes(codes.ctypes.data, 300, lo.ctypes.data, step.ctypes.data, outside.ctypes.data)
    assert not g.walk_codes_in_place()
    raw = np.zeros(codes.size + 128, np.uint8)
    start = (-raw.ctypes.data) % 64
    for offset, in_place in ((start, True), (start + 16, False)):
        buf = raw[offset:offset + codes.size]
        buf[:] = codes.ravel()
        g.set_walk_codes(buf.ctypes.data, 300, lo.ctypes.data, step.ctypes.data, outside.ctypes.data, view=True)
        assert g.walk_codes_in_place() is in_place
        np.testing.assert_array_equal(codes_of(g)[0], codes)
    nodes, out, q = np.array([0, 300], np.int32), np.empty(2, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"nodes: expected values in \[0, 300\), got nodes\[1\] = 300"):
        g.walk_distances(rows.ctypes.data, q.ctypes.data, nodes.ctypes.data, 2, out.ctypes.data)
    g.drop_walk_codes()
    with pytest.raises(ValueError, match="no walk codes"):
        g.walk_distances(rows.ctypes.data, q.ctypes.data, nodes.ctypes.data, 1, out.ctypes.data)
    # a file whose code arrays do not fit its graph is refused, not searched
    index = EmbeddingIndex(8, "l2", M=8, ef_construction=40)
    index.add(x)
    index.build_graph()
    path = tmp_path / "i.afk"
    index.save(path)
    meta, arrays = storage.load(path, mmap=False)
    arrays["graph_codes"] = arrays["graph_codes"][:-1]
    storage.save(path, meta, arrays)
    with pytest.raises(IndexFormatError, match="walk codes of shape"):
        EmbeddingIndex.load(path)


def test_the_raw_graph_takes_non_finite_rows(rng):
    """The index refuses NaN and inf; the raw graph does not check, and must neither crash
    nor let them spoil the codes of the other rows."""
    x, _ = clustered(rng, 3000, 8, 1)
    x[5] = np.nan
    x[9, 3], x[11, 2] = np.inf, -np.inf
    g, rows = graph_over(x)
    codes, lo, step, outside = codes_of(g)
    assert np.isfinite(lo).all() and np.isfinite(step).all()
    assert {9, 11} <= set(np.flatnonzero(outside))
    ok = np.isfinite(x).all(1)
    assert_codes_decode(codes[ok & ~outside.astype(bool)], lo, step, x[ok & ~outside.astype(bool)])
    q = np.ascontiguousarray(x[20:25])
    d, r = np.empty((5, 3), np.float32), np.empty((5, 3), np.int64)
    g.search(rows.ctypes.data, q.ctypes.data, 5, 3, 16, out_dist=d.ctypes.data, out_rows=r.ctypes.data)
    assert list(r[:, 0]) == list(range(20, 25)) and (d[:, 0] == 0).all()
