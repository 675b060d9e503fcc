"""float16 storage for k-NN: filtered_knn with a float16 database on the CPU, EmbeddingIndex(dtype=float16).

The reference is the float64 brute force over the float16-rounded vectors: the kernels score
those exact values in float32, so on small-integer data (exact in float16 and in float32
sums) ids and distances must match exactly, and on random data up to float32 rounding.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import affectkit._C as C
import affectkit.ops as ops
from affectkit.index import EmbeddingIndex, IndexFormatError, any_of, eq
from affectkit.index import storage
from affectkit.ops._bridge import ptr

from test_embedding_index import brute, clustered, make_data, masks, recall
from test_exact_knn import SIZES, check_close, int_vectors, reference

F16 = C.DTYPE_CODES["float16"]


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))


# ---- ops.filtered_knn / _C.exact_knn with float16 rows ---------------------------------------


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq,n,d", SIZES + [(29, 257, 40), (3, 700, 33)])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_query_dense", "per_query_sparse"])
def test_float16_database_exact_on_integer_vectors(metric, nq, n, d, mask_kind, gen):
    q, x = int_vectors(nq, d, gen), int_vectors(n, d, gen, lo=-40, hi=41)  # integers up to 40: exact in fp16
    mask = {
        "none": None,
        "shared": torch.rand(n, generator=gen) < 0.4,
        "per_query_dense": torch.rand(nq, n, generator=gen) < 0.6,
        "per_query_sparse": torch.rand(nq, n, generator=gen) < 0.05,
    }[mask_kind]
    for k in (1, 5, n + 3):
        got_d, got_i = ops.filtered_knn(q, x.half(), mask, k, metric)
        want_d, want_i = reference(q, x, mask, k, metric)
        assert got_d.dtype == torch.float32
        assert torch.equal(got_i, want_i), (k, got_i, want_i)
        assert torch.equal(got_d.double(), want_d)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_float16_database_random_vectors_match_rounded_reference(metric, gen):
    q = torch.randn(37, 45, generator=gen)
    x16 = (3 * torch.randn(1013, 45, generator=gen)).half()
    if metric == "cosine":  # the op normalises float16 rows in float32 and rounds them back
        x_ref = torch.nn.functional.normalize(x16.float(), dim=1).half().double()
    else:
        x_ref = x16.double()
    for mask in (None, torch.rand(1013, generator=gen) < 0.1, torch.rand(37, 1013, generator=gen) < 0.3):
        got_d, got_i = ops.filtered_knn(q, x16, mask, 11, metric)
        if metric == "cosine":
            _check_cosine(got_d, got_i, q, x_ref, mask, 11)
        else:
            check_close(got_d, got_i, q, x_ref, mask, 11, metric, 1e-5)


def _check_cosine(got_d, got_i, q, x_ref, mask, k):
    # reference with the rounded unit rows as they are (not renormalised): 1 - <q/|q|, x>
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    D = 1 - qn @ x_ref.T
    if mask is not None:
        D = D.masked_fill(~mask.bool().expand_as(D), float("inf"))
    want = torch.sort(D, dim=1, stable=True).values[:, :k]
    assert torch.allclose(got_d.double(), want, atol=1e-5)
    assert torch.allclose(torch.gather(D, 1, got_i), got_d.double(), atol=1e-5)


def test_float16_special_values_convert_exactly(gen):
    # Subnormals, the largest finite value, signed zeros: -<e_j, x_r> is exactly x[r, j].
    vals = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 0.0, -0.0, 1 / 3, 2.5e-3], dtype=torch.float16)
    n, d = 37, 21
    x = vals[torch.randint(0, len(vals), (n, d), generator=gen)]
    q = torch.eye(d)
    got_d, got_i = ops.filtered_knn(q, x, None, n, "ip")
    want = torch.sort(-x.double().T, dim=1, stable=True)
    assert torch.equal(got_i, want.indices) and torch.equal(got_d.double(), want.values)


def test_nan_float16_rows_are_never_returned(gen):
    q, x = torch.randn(3, 20, generator=gen), torch.randn(40, 20, generator=gen).half()
    x[7, 19] = float("nan")  # in the scalar tail of every vector path
    x[11, 0] = float("nan")
    for metric in ("l2", "ip", "cosine"):
        d, i = ops.filtered_knn(q, x, None, 40, metric)
        assert not torch.isin(i, torch.tensor([7, 11])).any() and (i[:, -2:] == -1).all()
        assert torch.isfinite(d[:, :38]).all()


def _raw16(q, x16, k, metric, **kw):
    nq, d = q.shape
    out_d = torch.full((nq, k), float("nan"))  # poisoned: unwritten elements show
    out_i = torch.full((nq, k), -7, dtype=torch.int64)
    C.exact_knn(C.DEVICE_CPU, C.DTYPE_CODES["float32"], ptr(q), nq, ptr(x16), x16.shape[0], d,
                ops.knn.METRICS[metric], k, out_dist=ptr(out_d), out_ids=ptr(out_i), db_dtype=F16, **kw)
    return out_d, out_i


def test_kernel_writes_every_output_with_float16_rows(gen):
    q, x = int_vectors(17, 19, gen), int_vectors(300, 19, gen)
    x16 = x.half()
    mask = (torch.rand(300, generator=gen) < 0.02).to(torch.uint8)
    norms = (x * x).sum(1)  # float32 squared norms passed in, as the index does
    for kw, m in (({}, None), ({"mask": ptr(mask)}, mask), ({"db_sqnorms": ptr(norms)}, None)):
        d, i = _raw16(q, x16, 12, "l2", **kw)
        want_d, want_i = reference(q, x, m, 12, "l2")
        assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


def test_candidate_lists_and_row_ids_with_float16_rows(gen):
    q, x = int_vectors(9, 6, gen), int_vectors(120, 6, gen)
    lists = [torch.randint(0, 120, (int(torch.randint(0, 30, (1,), generator=gen)),), generator=gen) for _ in range(9)]
    lists[0] = torch.tensor([5, 5, 7], dtype=torch.int64)
    lists[1] = torch.empty(0, dtype=torch.int64)
    offsets = torch.tensor([0] + [len(v) for v in lists]).cumsum(0)
    rows = torch.cat(lists)
    row_ids = torch.randperm(10_000, generator=gen)[:120] * 1_000_003
    d, i = _raw16(q, x.half(), 5, "ip", cand_offsets=ptr(offsets), cand_rows=ptr(rows), row_ids=ptr(row_ids))
    mask = torch.zeros(9, 120, dtype=torch.bool)
    for r, v in enumerate(lists):
        mask[r, v] = True
    want_d, want_i = reference(q, x, mask, 5, "ip", row_ids=row_ids)
    assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


def test_float16_validation(gen):
    q, x = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="database: expected dtype torch.float64 .* got torch.float16"):
        ops.filtered_knn(q.double(), x.half())
    with pytest.raises(TypeError, match="queries: expected dtype"):
        ops.filtered_knn(q.half(), x.half())  # float16 queries stay CUDA-only
    out = torch.empty(2, 1), torch.empty(2, 1, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"database: expected the dtype of queries \(float64\)"):
        C.exact_knn(0, C.DTYPE_CODES["float64"], ptr(q.double()), 2, ptr(x.half()), 4, 3, 1, 1,
                    out_dist=ptr(out[0]), out_ids=ptr(out[1]), db_dtype=F16)
    with pytest.raises(TypeError, match="database: expected"):
        C.exact_knn(0, 0, ptr(q), 2, ptr(x), 4, 3, 1, 1, out_dist=ptr(out[0]), out_ids=ptr(out[1]),
                    db_dtype=C.DTYPE_CODES["int64"])


def test_opcheck_float16_database(gen):
    q, x = torch.randn(5, 6, generator=gen), torch.randn(20, 6, generator=gen).half()
    for mask in (None, torch.rand(5, 20, generator=gen) < 0.5):
        for metric in ("l2", "cosine"):
            torch.library.opcheck(torch.ops.affectkit.filtered_knn.default, (q, x, mask, 3, metric))


# ---- EmbeddingIndex(dtype=float16) --------------------------------------------------------------


def f16_index(rng, n=400, d=12, metric="l2", integer=True, ids=None, **kw):
    x, attrs = make_data(rng, n, d, integer)
    index = EmbeddingIndex(d, metric, dtype=np.float16, **kw)
    got = index.add(x, attrs, ids=ids)
    return index, x.astype(np.float16).astype(np.float32), attrs, got


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_float16_index_every_filter_kind_matches_brute_force(metric, rng):
    index, x, attrs, ids = f16_index(rng, metric=metric, ids=rng.permutation(10**6)[:400] * 7919)
    assert index._vectors.dtype == np.float16
    q = rng.integers(-3, 4, (9, 12)).astype(np.float32)
    for name, (where, allowed) in masks(attrs).items():
        for k in (1, 10, 500):
            d, i = index.search(q, k, where=where, mode="exact")
            want_d, want_i = brute(x, ids, allowed, q, k, metric)
            assert np.array_equal(i, want_i), name
            assert np.array_equal(d.astype(np.float64), want_d), name
    # one call, a different filter per query
    cases = list(masks(attrs).values())
    q = rng.integers(-3, 4, (len(cases), 12)).astype(np.float32)
    d, i = index.search(q, 6, where=[w for w, _ in cases])
    want_d, want_i = brute(x, ids, np.stack([m for _, m in cases]), q, 6, metric)
    assert np.array_equal(i, want_i) and np.array_equal(d.astype(np.float64), want_d)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_float16_index_random_vectors_match_rounded_reference(metric, rng):
    x, attrs = make_data(rng, 1500, 37, integer=False)
    index = EmbeddingIndex(37, metric, dtype="float16")
    ids = index.add(x * 4.0, attrs)
    if metric == "cosine":
        # The index scales rows in float64 and rounds to float32, then to float16. numpy's
        # float32 division sometimes lands one float32 step across a float16 midpoint, and one
        # float16 step of a coordinate moves a distance by up to ~1.2e-4 (seed 220).
        x64 = x.astype(np.float64)
        unit = (x64 / np.linalg.norm(x64, axis=1, keepdims=True)).astype(np.float32)
        stored = unit.astype(np.float16).astype(np.float64)
    else:
        stored = (x * 4.0).astype(np.float16).astype(np.float64)
    q = rng.standard_normal((30, 37)).astype(np.float32)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q.astype(np.float64)
    for where, allowed in list(masks(attrs).values())[:5] + [(None, np.ones(1500, bool))]:
        d, i = index.search(q, 8, where=where, mode="exact")
        D = (1 - qq @ stored.T) if metric == "cosine" else (-(qq @ stored.T) if metric == "ip" else
                                                           ((qq[:, None] - stored[None]) ** 2).sum(-1))
        D = np.where(allowed[None], D, np.inf)
        want = np.sort(D, axis=1)[:, :8]
        assert np.allclose(d, want, rtol=1e-5, atol=1e-4)
        rows = np.searchsorted(ids, np.maximum(i, 0))
        assert np.allclose(np.where(i >= 0, np.take_along_axis(D, rows, 1), np.inf), d, rtol=1e-5, atol=1e-4)
        assert np.isin(i[i >= 0], ids[allowed]).all()


def test_float16_index_removal_padding_and_memory(rng):
    index, x, attrs, ids = f16_index(rng, metric="ip")
    ref32 = EmbeddingIndex(12, "ip")
    ref32.add(x, attrs, ids=ids)
    assert index._vectors[:400].nbytes * 2 == ref32._vectors[:400].nbytes
    gone = rng.choice(ids, 150, replace=False)
    index.remove(gone)
    alive = ~np.isin(ids, gone)
    q = rng.integers(-3, 4, (8, 12)).astype(np.float32)
    for where, allowed in list(masks(attrs).values())[:4] + [(None, np.ones(400, bool))]:
        for mode in ("exact", "auto", "approx"):
            d, i = index.search(q, 12, where=where, mode=mode)
            assert not np.isin(i, gone).any()
            if mode != "approx":
                assert np.array_equal(i, brute(x, ids, allowed & alive, q, 12, "ip")[1])
    d, i = index.search(q, 400, where={"label": "neutral"}, mode="exact")
    assert (i[:, -1] == -1).all() and np.isinf(d[:, -1]).all()


@pytest.fixture(scope="module")
def f16_graph_index():
    rng = np.random.default_rng(54321)
    x, q = clustered(rng, 6000, 32, 60)
    index = EmbeddingIndex(32, "cosine", dtype=np.float16, M=12, ef_construction=80, graph_min_rows=1000,
                           exact_max_rows=300)
    attrs = {"u": rng.random(6000), "label": rng.choice(["a", "b", "c"], 6000, p=[0.6, 0.3, 0.1])}
    ids = index.add(x, attrs)
    index.build_graph()
    return index, x, q, attrs, ids


@pytest.mark.parametrize("selectivity", [0.05, 0.5, 1.0])
def test_float16_graph_recall(selectivity, f16_graph_index):
    index, x, q, attrs, ids = f16_graph_index
    where = {"u": (0, selectivity)}
    exact = index.search(q, 10, where=where, mode="exact")
    approx = index.search(q, 10, where=where, mode="approx", ef=64)
    assert recall(approx[1], exact[1]) >= 0.95
    assert np.isin(approx[1], ids[attrs["u"] < selectivity]).all()
    assert (np.diff(approx[0], axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_float16_graph_other_metrics(metric, rng):
    x, q = clustered(rng, 3000, 24, 30)
    index = EmbeddingIndex(24, metric, dtype=np.float16, M=12, ef_construction=80)
    index.add(x)
    index.build_graph()
    exact = index.search(q, 10, mode="exact")
    approx = index.search(q, 10, mode="approx", ef=64)
    assert recall(approx[1], exact[1]) >= 0.95
    # graph distances are the float32 distances to the rounded rows, like the exact path's
    both = approx[1] == exact[1]
    assert np.allclose(approx[0][both], exact[0][both], rtol=1e-5, atol=1e-5)


def test_float16_save_load_round_trip_and_versions(tmp_path, f16_graph_index):
    index, x, q, attrs, ids = f16_graph_index
    where = [{"u": (0, 0.5)}] * 20 + [{"label": ["a", "c"]}] * 20 + [None] * 20
    path = tmp_path / "f16.afk"
    index.save(path)
    with open(path, "rb") as f:
        assert f.read(12)[8:12] == (2).to_bytes(4, "little")  # float16 files are format version 2
    for mode in ("exact", "approx"):
        before = index.search(q, 10, where=where, mode=mode)
        for mmap in (True, False):
            loaded = EmbeddingIndex.load(path, mmap=mmap)
            assert loaded.dtype == np.float16 and loaded._vectors.dtype == np.float16
            assert loaded.graph_size == index.graph_size
            after = loaded.search(q, 10, where=where, mode=mode)
            assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    # float32 indexes keep writing version 1, the format older releases read
    small = EmbeddingIndex(4, "l2")
    small.add(np.eye(4))
    small.build_graph()
    small.save(tmp_path / "f32.afk")
    with open(tmp_path / "f32.afk", "rb") as f:
        assert f.read(12)[8:12] == (1).to_bytes(4, "little")
    assert np.frombuffer(small._graph.to_flat(), np.int32)[1] == 1


def test_float16_load_rejects_mismatched_dtype(tmp_path, rng):
    index, *_ = f16_index(rng, n=30)
    path = tmp_path / "a.afk"
    index.save(path)
    blob = path.read_bytes()
    assert blob.count(b'"dtype": "float16"') == 1
    (tmp_path / "b.afk").write_bytes(blob.replace(b'"dtype": "float16"', b'"dtype": "float32"'))
    with pytest.raises(IndexFormatError, match="checksum"):
        EmbeddingIndex.load(tmp_path / "b.afk")
    with pytest.raises(IndexFormatError, match="do not match the header's dtype 'float32'"):
        EmbeddingIndex.load(tmp_path / "b.afk", verify=False)
    bad = bytearray(blob)
    bad[8] = 3
    (tmp_path / "c.afk").write_bytes(bytes(bad))
    with pytest.raises(IndexFormatError, match="version 3"):
        EmbeddingIndex.load(tmp_path / "c.afk")
    with pytest.raises(ValueError, match="version: expected one of"):
        storage.save(tmp_path / "d.afk", {}, {}, version=7)


def test_float16_graph_flat_format(rng):
    x = rng.standard_normal((80, 8)).astype(np.float16)
    g = C.HnswGraph(8, 1, 4, 20, 3, row_dtype=F16)
    g.add(x.ctypes.data, 80)
    assert g.row_dtype() == F16
    flat = np.frombuffer(g.to_flat(), np.int32).copy()
    assert flat[1] == 2 and flat[11] == F16
    back = C.HnswGraph.from_flat(flat.ctypes.data, flat.size)
    assert back.row_dtype() == F16 and back.size() == 80
    bad = flat.copy()
    bad[11] = C.DTYPE_CODES["int64"]
    with pytest.raises(ValueError, match="row dtype code"):
        C.HnswGraph.from_flat(bad.ctypes.data, bad.size)
    bad = flat.copy()
    bad[1] = 5
    with pytest.raises(ValueError, match="version 1 or 2"):
        C.HnswGraph.from_flat(bad.ctypes.data, bad.size)
    with pytest.raises(TypeError, match="row_dtype"):
        C.HnswGraph(8, 1, row_dtype=C.DTYPE_CODES["float64"])
    # search: float32 queries against the float16 rows; distances are those to the rounded rows
    q = rng.standard_normal((5, 8)).astype(np.float32)
    d, r = np.empty((5, 3), np.float32), np.empty((5, 3), np.int64)
    g.search(x.ctypes.data, q.ctypes.data, 5, 3, 80, out_dist=d.ctypes.data, out_rows=r.ctypes.data)
    D = ((q[:, None].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    assert np.allclose(np.take_along_axis(D, r, 1), d, rtol=1e-5)


def test_float16_index_bad_input(rng):
    with pytest.raises(TypeError, match="dtype: expected float32 or float16, got"):
        EmbeddingIndex(4, dtype=np.float64)
    with pytest.raises(TypeError, match="dtype: expected float32 or float16"):
        EmbeddingIndex(4, dtype="bfloat16")
    assert EmbeddingIndex(4, dtype=torch.float16).dtype == np.float16
    index = EmbeddingIndex(4, "l2", dtype=np.float16)
    with pytest.raises(ValueError, match="vectors: expected finite"):
        index.add(np.full((1, 4), np.nan))
    # values beyond float16's range would become inf when stored: refused, nothing added
    with pytest.raises(ValueError, match="vectors: expected values within float16's range"):
        index.add(np.full((2, 4), 1e6))
    assert len(index) == 0


@pytest.mark.parametrize("env,kernel", [({"AFFECTKIT_NO_AVX512": "1"}, ("f16c", "scalar")),
                                        ({"AFFECTKIT_NO_F16C": "1"}, ("scalar",))])
def test_every_conversion_path_matches(env, kernel, tmp_path):
    # The run-time dispatch picks AVX-512 where present; check the F16C and scalar paths in
    # child processes so each is exercised wherever the suite runs.
    script = textwrap.dedent(
        """
        import numpy as np, torch
        import affectkit._C as C
        import affectkit.ops as ops
        from affectkit.index import EmbeddingIndex
        print("kernel", C.knn_f16_kernel())
        g = torch.Generator().manual_seed(11)
        q = torch.randint(-3, 4, (41, 45), generator=g).float()
        x = torch.randint(-40, 41, (509, 45), generator=g).float()
        mask = torch.rand(509, generator=g) < 0.5
        for metric in ("l2", "ip"):
            d, i = ops.filtered_knn(q, x.half(), mask, 7, metric)
            if metric == "l2":
                D = ((q.double()[:, None] - x.double()[None]) ** 2).sum(-1)
            else:
                D = -(q.double() @ x.double().T)
            want = torch.sort(D.masked_fill(~mask, float("inf")), dim=1, stable=True)
            assert torch.equal(i, want.indices[:, :7]) and torch.equal(d.double(), want.values[:, :7])
        vals = torch.tensor([6e-8, -6e-8, 65504.0, -0.0, 1 / 3], dtype=torch.float16)
        xs = vals[torch.randint(0, 5, (23, 37), generator=g)]
        d, i = ops.filtered_knn(torch.eye(37), xs, None, 23, "ip")
        assert torch.equal(d.double(), torch.sort(-xs.double().T, dim=1, stable=True).values)
        rng = np.random.default_rng(0)
        c = rng.standard_normal((40, 40)).astype(np.float32)
        pts = c[rng.integers(0, 40, 3000)] + 0.4 * rng.standard_normal((3000, 40)).astype(np.float32)
        index = EmbeddingIndex(40, "l2", dtype=np.float16)
        index.add(pts)
        index.build_graph()
        qs = pts[:50] + 0.05
        exact = index.search(qs, 10, mode="exact")[1]
        approx = index.search(qs, 10, mode="approx")[1]
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
        assert rec >= 0.95, rec
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.split()[1] in kernel, proc.stdout
