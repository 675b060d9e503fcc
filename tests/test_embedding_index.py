"""affectkit.index.EmbeddingIndex: filters, ids, removal, persistence, threads, planner."""

import os

import numpy as np
import pytest
import torch

from affectkit.index import (
    EmbeddingIndex,
    IndexFormatError,
    all_of,
    any_of,
    between,
    eq,
    ids_in,
    isin,
    row_mask,
)

from _support import run_threads

LABELS = ["joy", "anger", "sadness", "fear", "neutral"]
TAGS = ["a", "b", "c", "d", "e"]


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))


def make_data(rng, n, d, integer=True):
    x = rng.integers(-3, 4, (n, d)).astype(np.float32) if integer else rng.standard_normal((n, d)).astype(np.float32)
    attrs = {
        "label": rng.choice(LABELS, n, p=[0.5, 0.2, 0.15, 0.1, 0.05]),
        "ts": rng.uniform(0, 100, n),
        "tags": [set(rng.choice(TAGS, rng.integers(0, 4), replace=False).tolist()) for _ in range(n)],
    }
    return x, attrs


def brute(x, ids, allowed, q, k, metric):
    """float64 brute force over rows where allowed; ties to the smaller id; -1/inf padding."""
    x, q = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300) * (np.linalg.norm(x, axis=1, keepdims=True) > 0)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        D = 1 - q @ x.T
    elif metric == "ip":
        D = -(q @ x.T)
    else:
        D = ((q[:, None] - x[None]) ** 2).sum(-1)
    out_d = np.full((len(q), k), np.inf)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for r in range(len(q)):
        a = allowed if allowed.ndim == 1 else allowed[r]
        rows = np.flatnonzero(a)
        order = np.lexsort((ids[rows], D[r, rows]))[:k]
        out_d[r, : len(order)] = D[r, rows[order]]
        out_i[r, : len(order)] = ids[rows[order]]
    return out_d, out_i


def filled_index(rng, n=400, d=12, metric="l2", integer=True, ids=None):
    x, attrs = make_data(rng, n, d, integer)
    index = EmbeddingIndex(d, metric)
    got_ids = index.add(x, attrs, ids=ids)
    return index, x, attrs, got_ids


def masks(attrs):
    lab, ts, tags = attrs["label"], attrs["ts"], attrs["tags"]
    return {
        "eq": ({"label": "joy"}, lab == "joy"),
        "in": ({"label": ["fear", "neutral"]}, np.isin(lab, ["fear", "neutral"])),
        "range": ({"ts": (20, 30)}, (ts >= 20) & (ts < 30)),
        "open_lo": ({"ts": (None, 5)}, ts < 5),
        "open_hi": ({"ts": (95.5, None)}, ts >= 95.5),
        "and": ({"label": "anger", "ts": (0, 50)}, (lab == "anger") & (ts < 50)),
        "any_of": (any_of("tags", ["a", "e"]), np.array([bool(t & {"a", "e"}) for t in tags])),
        "all_of": (all_of("tags", ["b", "c"]), np.array([{"b", "c"} <= t for t in tags])),
        "or_not": (eq("label", "fear") | ~between("ts", 10, 90), (lab == "fear") | ~((ts >= 10) & (ts < 90))),
        "nested": ((isin("label", ["joy", "anger"]) & any_of("tags", ["c"])) | eq("label", "neutral"),
                   (np.isin(lab, ["joy", "anger"]) & np.array(["c" in t for t in tags])) | (lab == "neutral")),
        "none_match": ({"label": "boredom"}, np.zeros(len(lab), bool)),
    }


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_filter_kind_matches_brute_force(metric, rng):
    index, x, attrs, ids = filled_index(rng, metric=metric, ids=rng.permutation(10**6)[:400] * 7919)
    q = rng.integers(-3, 4, (9, 12)).astype(np.float32)
    for name, (where, allowed) in masks(attrs).items():
        for k in (1, 10, 500):
            d, i = index.search(q, k, where=where, mode="exact")
            want_d, want_i = brute(x, ids, allowed, q, k, metric)
            assert np.array_equal(i, want_i), name
            assert np.array_equal(d.astype(np.float64), want_d), name


def test_caller_mask_and_id_allow_list(rng):
    index, x, attrs, ids = filled_index(rng)
    q = rng.integers(-3, 4, (5, 12)).astype(np.float32)
    allowed = rng.random(400) < 0.2
    assert np.array_equal(index.search(q, 7, where=row_mask(allowed))[1], brute(x, ids, allowed, q, 7, "l2")[1])
    assert np.array_equal(index.search(q, 7, where=allowed)[1], brute(x, ids, allowed, q, 7, "l2")[1])
    pick = rng.choice(ids, 30, replace=False)
    got = index.search(q, 7, where=ids_in(np.concatenate([pick, [10**12]])))[1]  # unknown ids are ignored
    assert np.array_equal(got, brute(x, ids, np.isin(ids, pick), q, 7, "l2")[1])


def test_per_query_filters_in_one_call(rng):
    index, x, attrs, ids = filled_index(rng)
    cases = list(masks(attrs).values())
    q = rng.integers(-3, 4, (len(cases) + 2, 12)).astype(np.float32)
    where = [w for w, _ in cases] + [None, cases[0][0]]
    allowed = np.stack([m for _, m in cases] + [np.ones(400, bool), cases[0][1]])
    d, i = index.search(q, 6, where=where)
    want_d, want_i = brute(x, ids, allowed, q, 6, "l2")
    assert np.array_equal(i, want_i) and np.array_equal(d.astype(np.float64), want_d)
    plans = index.explain(where)
    assert len(plans) == len(where) and all(p["mode"] == "exact" for p in plans)


def test_cosine_normalises_at_add_time(rng):
    index, x, attrs, ids = filled_index(rng, metric="cosine", integer=False)
    q = rng.standard_normal((6, 12)).astype(np.float32)
    allowed = attrs["label"] == "joy"
    d, i = index.search(q * 3.0, 5, where={"label": "joy"})  # query scale must not matter
    want_d, _ = brute(x, ids, allowed, q, 5, "cosine")
    assert np.allclose(d, want_d, atol=1e-5)
    assert np.all(np.isin(i, ids[allowed]))


def test_removed_rows_are_skipped_by_every_path(rng):
    index, x, attrs, ids = filled_index(rng, metric="ip")
    q = rng.integers(-3, 4, (8, 12)).astype(np.float32)
    gone = rng.choice(ids, 150, replace=False)
    assert index.remove(gone) == 150 and len(index) == 250
    alive = ~np.isin(ids, gone)
    for where, allowed in list(masks(attrs).values())[:4] + [(None, np.ones(400, bool))]:
        for mode in ("exact", "auto"):
            got = index.search(q, 12, where=where, mode=mode)[1]
            assert np.array_equal(got, brute(x, ids, allowed & alive, q, 12, "ip")[1])
    with pytest.raises(ValueError, match="unknown or already removed id"):
        index.remove(gone[:1])
    # a removed id may be added again: the new row is found, the old one stays removed
    index.add(x[:1] * 0 + 1, {"label": ["joy"]}, ids=gone[:1])
    assert gone[0] in index.search(np.ones((1, 12), np.float32), 400, where={"label": "joy"}, mode="exact")[1]


def test_duplicates_empty_index_and_padding(rng):
    index = EmbeddingIndex(4, "l2")
    d, i = index.search(np.ones((3, 4), np.float32), 5)
    assert d.shape == (3, 5) and (i == -1).all() and np.isinf(d).all()
    v = np.array([[1, 2, 3, 4]], np.float32)
    index.add(np.repeat(v, 6, 0), ids=[50, 40, 30, 20, 10, 60])
    d, i = index.search(v, 8)
    assert i.tolist() == [[10, 20, 30, 40, 50, 60, -1, -1]] and (d[0, :6] == 0).all() and np.isinf(d[0, 6:]).all()
    d, i = index.search(np.zeros((0, 4), np.float32), 3)
    assert d.shape == (0, 3)


def test_input_types_and_assigned_ids(rng):
    index = EmbeddingIndex(3, "ip")
    a = index.add(np.eye(3, dtype=np.float64))
    b = index.add(torch.eye(3) * 2, {"label": ["x", "y", "z"]})
    c = index.add([[1.0, 1.0, 1.0]], {"label": ["x"]}, ids=[2**40])
    assert a.tolist() == [0, 1, 2] and b.tolist() == [3, 4, 5] and c.tolist() == [2**40]
    assert index.add(np.ones((1, 3)))[0] == 2**40 + 1
    d, i = index.search(torch.tensor([[0.0, 0.0, 1.0]]), 2, where={"label": ["x", "z"]})
    assert i.tolist() == [[5, 2**40]] and d.tolist() == [[-2.0, -1.0]]
    # rows added without an attribute never match a condition on it
    assert index.search(np.ones((1, 3)), 10, where={"label": "x"})[1][0].tolist()[:2] == [2**40, 3]


def test_save_load_round_trip(tmp_path, rng):
    index, x, attrs, ids = filled_index(rng, metric="cosine", integer=False)
    index.remove(ids[:10])
    q = rng.standard_normal((7, 12)).astype(np.float32)
    where = [{"label": "joy"}, any_of("tags", ["a"]), None, {"ts": (10, 40)}, eq("label", "fear") | eq("label", "joy"),
             None, {"label": ["anger"]}]
    before = index.search(q, 9, where=where)
    path = tmp_path / "index.afk"
    index.save(path)
    for mmap in (True, False):
        loaded = EmbeddingIndex.load(path, mmap=mmap)
        after = loaded.search(q, 9, where=where)
        assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
        assert len(loaded) == 390 and loaded.attributes == index.attributes
        assert loaded.explain({"label": "joy"}) == index.explain({"label": "joy"})
    # a memory-mapped index can still grow (its arrays are copied on the first add)
    loaded = EmbeddingIndex.load(path, mmap=True)
    new = loaded.add(q[:2], {"label": ["joy", "joy"]})
    assert np.isin(new, loaded.search(q[:2], 1, where={"label": "joy"})[1]).all()
    assert os.listdir(tmp_path) == ["index.afk"]  # no temporary files left behind


def test_save_lays_out_every_header_length_consistently(tmp_path):
    """The header names the arrays' offsets, so its length depends on them: headers of every
    length around the 64-byte alignment steps must describe the file that is written. (The
    first fix-point loop kept a stale header when two passes gave equal lengths, and about 1 in
    60 of these files failed to load.)"""
    from affectkit.index import storage

    for i in range(260):
        arrays = {"v": np.arange(i % 7 + 1, dtype=np.float32), "w": np.arange(3, dtype=np.int64) * i}
        path = tmp_path / f"{i}.afk"
        storage.save(path, {"pad": "x" * i}, arrays)
        meta, got = storage.load(path, mmap=False)
        assert meta == {"pad": "x" * i}
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype and np.array_equal(got[name], want), (i, name)


def test_load_rejects_truncated_foreign_and_corrupted_files(tmp_path, rng):
    index, *_ = filled_index(rng, n=50)
    path = tmp_path / "a.afk"
    index.save(path)
    blob = path.read_bytes()
    (tmp_path / "short").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexFormatError, match="truncated"):
        EmbeddingIndex.load(tmp_path / "short")
    (tmp_path / "tiny").write_bytes(blob[:10])
    with pytest.raises(IndexFormatError, match="not an affectkit index|truncated"):
        EmbeddingIndex.load(tmp_path / "tiny")
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(IndexFormatError, match="not an affectkit index"):
        EmbeddingIndex.load(tmp_path / "foreign")
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 0xFF
    (tmp_path / "flipped").write_bytes(bytes(bad))
    with pytest.raises(IndexFormatError, match="checksum"):
        EmbeddingIndex.load(tmp_path / "flipped")
    bad = bytearray(blob)
    bad[8] = 99
    (tmp_path / "version").write_bytes(bytes(bad))
    with pytest.raises(IndexFormatError, match="version 99"):
        EmbeddingIndex.load(tmp_path / "version")


def test_bad_input_raises_clear_errors(rng):
    index, x, attrs, ids = filled_index(rng, n=20, d=5)
    q = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"vectors: expected shape \(m, 5\)"):
        index.add(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="vectors: expected finite"):
        index.add(np.full((1, 5), np.nan))
    with pytest.raises(ValueError, match="queries: expected finite"):
        index.search(np.full((1, 5), np.inf), 1)
    with pytest.raises(ValueError, match=r"queries: expected shape \(m, 5\)"):
        index.search(np.zeros(5), 1)
    with pytest.raises(TypeError, match="vectors: expected a numpy"):
        index.add("abc")
    with pytest.raises(ValueError, match="unknown attribute 'mood'"):
        index.search(q, 1, where={"mood": "joy"})
    with pytest.raises(TypeError, match="where: expected None, a dict"):
        index.search(q, 1, where="label == joy")
    with pytest.raises(TypeError, match="range needs a numeric attribute"):
        index.search(q, 1, where={"label": (1, 2)})
    with pytest.raises(TypeError, match="expected str values for categorical"):
        index.search(q, 1, where={"label": 3})
    with pytest.raises(TypeError, match="expected a number"):
        index.search(q, 1, where={"ts": ("a", None)})
    with pytest.raises(TypeError, match="any_of/all_of need a multi-label"):
        index.search(q, 1, where=any_of("label", ["joy"]))
    with pytest.raises(TypeError, match="holds label sets"):
        index.search(q, 1, where={"tags": "a"})
    with pytest.raises(ValueError, match="one filter per query"):
        index.search(q, 1, where=[None])
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k: expected a positive int"):
            index.search(q, k)
    with pytest.raises(ValueError, match="mode: expected one of"):
        index.search(q, 1, mode="fast")
    with pytest.raises(ValueError, match=r"attributes\['label'\]: expected 1 entries"):
        index.add(np.zeros((1, 5)), {"label": ["a", "b"]})
    with pytest.raises(TypeError, match=r"attributes\['label'\]: expected category values like earlier rows"):
        index.add(np.zeros((1, 5)), {"label": [1.5]})
    with pytest.raises(ValueError, match="ids: id .* is already in the index"):
        index.add(np.zeros((1, 5)), ids=[ids[0]])
    with pytest.raises(TypeError, match=r"attributes\['tags'\]: expected str or int"):
        index.add(np.zeros((1, 5)), {"tags": [{1.5}]})
    with pytest.raises(ValueError, match="ids: expected non-negative"):
        index.add(np.zeros((1, 5)), ids=[-1])
    with pytest.raises(ValueError, match="ids: expected distinct"):
        index.add(np.zeros((2, 5)), ids=[7000, 7000])
    with pytest.raises(ValueError, match="mask: expected 20 entries"):
        index.search(q, 1, where=row_mask(np.ones(3, bool)))
    with pytest.raises(ValueError, match="dim"):
        EmbeddingIndex(0)
    with pytest.raises(ValueError, match="metric"):
        EmbeddingIndex(4, "hamming")
    with pytest.raises(TypeError, match="dtype"):
        EmbeddingIndex(4, dtype=np.float64)
    assert len(index) == 20  # nothing was half-added by the failed calls


def test_vectors_are_checked_and_normalised_in_one_pass(rng):
    import affectkit._C as C
    from affectkit.index.embedding_index import _as_matrix

    x = rng.standard_normal((37, 13)) * rng.uniform(1e-3, 1e3, (37, 1))  # float64 in
    x[5] = 0
    x[9] = 1e20  # float32 squares overflow here; the float64 sum does not
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    got = _as_matrix("queries", x, 13, normalise=True)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (37, 13)
    assert np.allclose(got, x / np.where(norms == 0, 1, norms), rtol=1e-6, atol=1e-7)
    assert (got[5] == 0).all() and np.allclose(got[9], 13**-0.5)
    assert np.array_equal(_as_matrix("queries", x, 13), x.astype(np.float32))  # no scaling asked
    for bad in (np.nan, np.inf, -np.inf, 1e300):  # 1e300: finite in float64, inf in float32
        y = x.copy()
        y[[23, 30], 4] = bad
        with pytest.raises(ValueError, match="queries: expected finite values, got NaN or inf in row 23"):
            _as_matrix("queries", y, 13, normalise=True)
    with pytest.raises(ValueError, match="src"):
        C.prepare_rows(0, 0, 2, 3)
    with pytest.raises(ValueError, match="n"):
        C.prepare_rows(got.ctypes.data, 0, -1, 13)


def test_label_set_filters_past_one_word_and_fresh_statistics(rng):
    # 70 labels need two 64-bit words a row; estimates follow rows added after a search.
    labels = [f"l{i}" for i in range(70)]
    sets = [set(rng.choice(labels, rng.integers(0, 5), replace=False).tolist()) for _ in range(300)]
    x = rng.standard_normal((300, 6)).astype(np.float32)
    index = EmbeddingIndex(6, "l2")
    ids = index.add(x, {"tags": sets})
    q = rng.standard_normal((4, 6)).astype(np.float32)
    code = index._table.columns["tags"]._code_of  # codes go by first appearance
    low, high = min(code, key=code.get), max(code, key=code.get)
    assert code[high] >= 64
    for wanted in ([low], [high], [low, high, "l40"], [high, "unknown"]):
        allowed = np.array([bool(t & set(wanted)) for t in sets])
        d, i = index.search(q, 7, where=any_of("tags", wanted), mode="exact")
        assert np.array_equal(i, brute(x, ids, allowed, q, 7, "l2")[1])
    before = index.explain(any_of("tags", ["l3"]))["estimated_selectivity"]
    assert abs(before - np.mean(["l3" in t for t in sets])) < 1e-12
    index.add(rng.standard_normal((100, 6)).astype(np.float32), {"tags": [{"l3"}] * 100})
    after = index.explain(any_of("tags", ["l3"]))["estimated_selectivity"]
    assert abs(after - (sum("l3" in t for t in sets) + 100) / 400) < 1e-12


def test_explain_estimates_from_statistics(rng):
    index, x, attrs, ids = filled_index(rng, n=3000, d=4)
    for where, allowed in masks(attrs).values():
        plan = index.explain(where)
        assert plan["matching_rows"] == int(allowed.sum())
        assert plan["live_rows"] == 3000 and plan["mode"] == "exact"
    # single conditions: the statistics are exact (value counts) or close (histogram)
    assert index.explain({"label": "joy"})["estimated_rows"] == int((attrs["label"] == "joy").sum())
    est = index.explain({"ts": (20, 60)})["estimated_selectivity"]
    assert abs(est - ((attrs["ts"] >= 20) & (attrs["ts"] < 60)).mean()) < 0.02
    est = index.explain(any_of("tags", ["a"]))["estimated_selectivity"]
    assert abs(est - np.mean(["a" in t for t in attrs["tags"]])) < 1e-9
    assert index.explain(None, mode="approx")["mode"] == "approx"


def test_concurrent_searches_and_writes(rng):
    index, x, attrs, ids = filled_index(rng, n=2000, d=16, integer=False)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    want = index.search(q, 10, where={"label": ["joy", "fear"]})

    def reader():
        for _ in range(15):
            got = index.search(q, 10, where={"label": ["joy", "fear"]})
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])

    run_threads(*[reader] * 4)

    # Writers racing readers: every result must be a valid answer for some state of the index.
    far = np.full((50, 16), 1e3, np.float32)  # added rows never rank near the queries

    def writer():
        for j in range(10):
            index.add(far, {"label": ["joy"] * 50})
            index.remove(index.search(far[:1], 50, where={"label": "joy"}, mode="exact")[1][0])

    run_threads(*[reader] * 3, writer)
    assert len(index) == 2000


# ---- approximate (graph) mode: tested on recall, not equality -----------------------------------

def clustered(rng, n, d, nq, clusters=40):
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    q = centers[rng.integers(0, clusters, nq)] + 0.4 * rng.standard_normal((nq, d)).astype(np.float32)
    return x, q


def recall(approx_ids, exact_ids):
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum()) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def graph_index():
    rng = np.random.default_rng(12345)
    x, q = clustered(rng, 6000, 32, 60)
    index = EmbeddingIndex(32, "cosine", M=12, ef_construction=80, graph_min_rows=1000, exact_max_rows=300)
    attrs = {"u": rng.random(6000), "label": rng.choice(LABELS, 6000, p=[0.5, 0.2, 0.15, 0.1, 0.05])}
    ids = index.add(x, attrs)
    index.build_graph()
    return index, x, q, attrs, ids


@pytest.mark.parametrize("selectivity", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_graph_recall_at_several_selectivities(selectivity, metric, graph_index):
    index, x, q, attrs, ids = graph_index
    if metric != "cosine":
        index = EmbeddingIndex(32, metric, M=12, ef_construction=80)
        index.add(x, attrs)
        index.build_graph()
    where = {"u": (0, selectivity)}
    exact = index.search(q, 10, where=where, mode="exact")
    approx = index.search(q, 10, where=where, mode="approx", ef=64)
    assert recall(approx[1], exact[1]) >= 0.95
    allowed_ids = ids[attrs["u"] < selectivity]
    assert np.isin(approx[1], allowed_ids).all()  # never a row outside the filter
    assert (np.diff(approx[0], axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
@pytest.mark.parametrize("d", [37, 16, 5])  # a 16-wide body plus a tail, no tail, only a tail
def test_graph_distances_are_the_true_distances(metric, d, rng):
    """The graph walk scores rows four at a time: every distance it returns is the row's own."""
    x, q = clustered(rng, 700, d, 25)
    index = EmbeddingIndex(d, metric, M=8, ef_construction=40, graph_min_rows=1)
    ids = index.add(x)
    index.build_graph()
    dist, got = index.search(q, 10, mode="approx", ef=32)
    assert (got >= 0).all()
    xr = x.astype(np.float64)[np.searchsorted(ids, got)]  # (nq, 10, d); ids are assigned in order
    q64 = q.astype(np.float64)
    if metric == "cosine":
        xr /= np.linalg.norm(xr, axis=-1, keepdims=True)
        q64 /= np.linalg.norm(q64, axis=-1, keepdims=True)
        want = 1 - (q64[:, None] * xr).sum(-1)
    elif metric == "ip":
        want = -(q64[:, None] * xr).sum(-1)
    else:
        want = ((q64[:, None] - xr) ** 2).sum(-1)
    np.testing.assert_allclose(dist, want, rtol=0, atol=1e-5 * (np.abs(want).max() + 1.0))


def test_graph_respects_tombstones_and_covers_later_rows(graph_index, tmp_path):
    index, x, q, attrs, ids = graph_index
    index = EmbeddingIndex.load(_saved(index, tmp_path), mmap=False)
    exact = index.search(q, 5, mode="exact")[1]
    gone = np.unique(exact[:, :2])
    index.remove(gone)
    approx = index.search(q, 5, mode="approx")[1]
    assert not np.isin(approx, gone).any()
    # rows added after the graph was built are found through the exact tail scan
    new = index.add(q[:5] * 1.0, {"u": np.zeros(5), "label": ["joy"] * 5})
    index.settings.graph_min_rows = 0
    d, i = index.search(q[:5], 3, mode="approx")
    assert index.graph_size == len(ids) + 5  # approx mode extends the graph first
    assert np.array_equal(i[:, 0], new)


def _link_audit(index):
    return index._graph.audit_links(index._vectors.ctypes.data)


@pytest.mark.parametrize("metric,dtype", [("cosine", np.float32), ("l2", np.float32), ("ip", np.float16)])
def test_graph_build_places_links_as_a_reselection_would(metric, dtype, rng, tmp_path):
    """A full level-0 list takes a new link from its kept flags (a few distances), where the
    build once re-selected the whole list: every placement equals that re-selection, the lists
    stay sorted and flagged as the heuristic would flag them. The same after save, load and
    more rows (a loaded graph flags its lists again at their first re-selection)."""
    x, _ = clustered(rng, 5000, 24, 1, clusters=60)
    index = EmbeddingIndex(24, metric, dtype=dtype, M=6, ef_construction=60, graph_min_rows=1)
    index.add(x[:100])
    index.build_graph()
    for new_rows in (x[100:3000], x[3000:]):
        index._graph.set_placement_check(True)
        index.add(new_rows)
        index.build_graph()
        check = index._graph.placement_check()
        assert check["pruned"] >= 500 and check["kept"] >= 500, check  # both branches ran
        assert check["pruned_mismatch"] == 0 and check["kept_mismatch"] == 0, check
        audit = _link_audit(index)
        assert audit["lists"] == index.graph_size
        assert audit["full"] >= 0.2 * audit["lists"] and audit["marked"] >= 0.5 * audit["full"], audit
        assert audit["pruned"] >= audit["marked"], audit
        assert audit["unsorted"] == audit["kept_violations"] == audit["pruned_unwitnessed"] == 0, audit
        index = EmbeddingIndex.load(_saved(index, tmp_path), mmap=False)
        assert _link_audit(index)["marked"] == 0


def _saved(index, tmp_path):
    path = tmp_path / "g.afk"
    index.save(path)
    return path


def test_graph_survives_save_load(graph_index, tmp_path):
    index, x, q, attrs, ids = graph_index
    where = [{"u": (0, 0.5)}] * 30 + [{"label": ["joy", "anger"]}] * 30
    before = index.search(q, 10, where=where, mode="approx")
    path = _saved(index, tmp_path)
    for mmap in (True, False):
        loaded = EmbeddingIndex.load(path, mmap=mmap)
        assert loaded.graph_size == index.graph_size
        after = loaded.search(q, 10, where=where, mode="approx")
        assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])


def test_planner_switches_with_selectivity(graph_index, monkeypatch):
    index, x, q, attrs, ids = graph_index
    # 6000 rows is small: make a scanned distance costlier so the crossover falls inside
    monkeypatch.setattr(index.settings, "exact_speedup", 1.0)
    low, high = index.explain({"u": (0, 0.02)}), index.explain({"u": (0, 0.9)})
    assert low["mode"] == "exact" and high["mode"] == "approx"
    assert abs(low["estimated_selectivity"] - 0.02) < 0.01 and abs(high["estimated_selectivity"] - 0.9) < 0.02
    assert "exact_max_rows" in low["reason"] and "graph cost" in high["reason"]
    assert low["ef"] == 0 and high["ef"] == index.settings.ef_for(high["matching_rows"] / high["live_rows"]) > 0
    assert index.settings.ef_for(0.05) < index.settings.ef_for(0.5) < index.settings.ef_for(1.0) == index.settings.ef
    exact = index.search(q, 10, where={"u": (0, 0.9)}, mode="exact")[1]
    assert recall(index.search(q, 10, where={"u": (0, 0.9)})[1], exact) >= 0.95
    assert np.array_equal(index.search(q, 10, where={"u": (0, 0.02)})[1],
                          index.search(q, 10, where={"u": (0, 0.02)}, mode="exact")[1])
    # The graph's beam is never narrower than k: a long list makes the walk dear (100x the beam,
    # 10x the cost), and the scan wins where it lost at k = 10.
    half = {"u": (0, 0.5)}
    assert index.explain(half)["mode"] == "approx"
    wide = index.explain(half, k=2000)
    assert wide["mode"] == "exact" and "graph cost" in wide["reason"], wide["reason"]


def test_graph_boundary_validation(gen):
    import affectkit._C as C

    with pytest.raises(ValueError, match="M: expected a value in"):
        C.HnswGraph(4, 0, 1)
    with pytest.raises(ValueError, match="dim: expected a positive"):
        C.HnswGraph(0, 0)
    with pytest.raises(ValueError, match="metric"):
        C.HnswGraph(4, 7)
    g = C.HnswGraph(4, 1, 4, 10, 1)
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    g.add(x.ctypes.data, 50)
    out_d, out_r = np.empty((1, 3), np.float32), np.empty((1, 3), np.int64)
    with pytest.raises(ValueError, match="k: expected a positive"):
        g.search(x.ctypes.data, x.ctypes.data, 1, 0, 10, out_dist=out_d.ctypes.data, out_rows=out_r.ctypes.data)
    with pytest.raises(ValueError, match="out_dist"):
        g.search(x.ctypes.data, x.ctypes.data, 1, 3, 10)
    flat = np.frombuffer(g.to_flat(), np.int32).copy()
    ok = C.HnswGraph.from_flat(flat.ctypes.data, flat.size)
    assert ok.size() == 50
    for pos, value, msg in ((0, 1, "magic"), (8, 10**6, "row count"), (11 + 50 + 1, 999, "link out of range"), (11 + 50, 99, "link count")):
        bad = flat.copy()
        bad[pos] = value
        with pytest.raises(ValueError, match=msg):
            C.HnswGraph.from_flat(bad.ctypes.data, bad.size)
    with pytest.raises(ValueError, match="words"):
        C.HnswGraph.from_flat(flat.ctypes.data, flat.size - 1)
