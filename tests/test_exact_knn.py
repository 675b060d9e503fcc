"""affectkit.ops.filtered_knn and _C.exact_knn: exact filtered k-NN against a float64 brute force."""

import math

import numpy as np
import pytest
import torch

import affectkit._C as C
import affectkit.ops as ops
from affectkit.ops._bridge import ptr

from _support import capture_cuda_graph, requires_cuda

METRICS = ["l2", "ip", "cosine"]


def distances64(q, x, metric):
    q, x = q.double(), x.double()
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        x = torch.nn.functional.normalize(x, dim=1)
        return 1 - q @ x.T
    if metric == "ip":
        return -(q @ x.T)
    return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def reference(q, x, mask, k, metric, row_ids=None):
    """float64 brute force; ties go to the smaller id; pad with (-1, inf)."""
    nq, n = q.shape[0], x.shape[0]
    D = distances64(q, x, metric) if n else torch.zeros(nq, 0, dtype=torch.float64)
    ids = torch.arange(n) if row_ids is None else row_ids
    if mask is not None:
        D = D.masked_fill(~mask.bool().expand(nq, n), math.inf)
    out_d = torch.full((nq, k), math.inf, dtype=torch.float64)
    out_i = torch.full((nq, k), -1, dtype=torch.int64)
    order_by_id = torch.argsort(ids)
    for i in range(nq):
        d_sorted = D[i, order_by_id]
        pos = torch.sort(d_sorted, stable=True).indices[:k]  # stable: smaller id first on ties
        m = min(k, n)
        out_d[i, :m] = d_sorted[pos]
        out_i[i, :m] = ids[order_by_id][pos]
    out_i[torch.isinf(out_d)] = -1
    return out_d, out_i


def int_vectors(n, d, gen, lo=-3, hi=4):
    """Small integer entries: every dot product is exact in float32, so ids must match exactly."""
    return torch.randint(lo, hi, (n, d), generator=gen).float()


def check_close(got_d, got_i, q, x, mask, k, metric, tol):
    """For rounding-sensitive data: distances match, each id is allowed and really that far."""
    want_d, _ = reference(q, x, mask, k, metric)
    assert got_d.shape == (q.shape[0], k) and got_i.dtype == torch.int64
    pad = got_i == -1
    assert torch.equal(pad, torch.isinf(want_d))
    assert torch.isinf(got_d[pad]).all()
    assert torch.allclose(got_d[~pad].double(), want_d[~pad], atol=tol, rtol=tol)
    D = distances64(q, x, metric)
    allowed = None if mask is None else mask.bool().expand(q.shape[0], x.shape[0])
    for i in range(q.shape[0]):
        ids = got_i[i][got_i[i] >= 0]
        assert len(set(ids.tolist())) == len(ids)
        if len(ids):
            assert torch.allclose(D[i, ids], got_d[i, : len(ids)].double(), atol=tol, rtol=tol)
            if allowed is not None:
                assert allowed[i, ids].all()


SIZES = [(1, 1, 1), (5, 17, 3), (13, 101, 29), (31, 389, 64), (2, 1000, 7), (257, 389, 64)]  # 257: past a query block (256)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq,n,d", SIZES)
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_query_dense", "per_query_sparse"])
def test_exact_ids_on_integer_vectors(metric, nq, n, d, mask_kind, gen):
    q, x = int_vectors(nq, d, gen), int_vectors(n, d, gen)
    mask = {
        "none": None,
        "shared": torch.rand(n, generator=gen) < 0.4,
        "per_query_dense": torch.rand(nq, n, generator=gen) < 0.6,
        "per_query_sparse": torch.rand(nq, n, generator=gen) < 0.05,
    }[mask_kind]
    for k in (1, 5, n + 3):
        got_d, got_i = ops.filtered_knn(q, x, mask, k, metric)
        want_d, want_i = reference(q, x, mask, k, metric)
        assert torch.equal(got_i, want_i), (k, got_i, want_i)
        assert torch.equal(got_d.double(), want_d)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_vectors_match_reference(metric, dtype, gen):
    q = torch.randn(23, 47, generator=gen, dtype=dtype)
    x = torch.randn(611, 47, generator=gen, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for mask in (None, torch.rand(611, generator=gen) < 0.1, torch.rand(23, 611, generator=gen) < 0.3):
        got_d, got_i = ops.filtered_knn(q, x, mask, 9, metric)
        assert got_d.dtype == dtype
        check_close(got_d, got_i, q, x, mask, 9, metric, tol)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicate_vectors_tie_to_smaller_id(metric, gen):
    base = torch.randn(7, 16, generator=gen)
    x = base.repeat(5, 1)  # row r duplicates rows r % 7
    q = base[:3] + 0.01 * torch.randn(3, 16, generator=gen)
    got_d, got_i = ops.filtered_knn(q, x, None, 5, metric)
    for i in range(3):
        # the 5 copies of the nearest base vector tie exactly: ids ascending
        ids = got_i[i].tolist()
        assert ids == sorted(ids) and len({r % 7 for r in ids}) == 1
        assert (got_d[i] == got_d[i, 0]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_all_filtered_empty_database_and_no_queries(metric, gen):
    q, x = torch.randn(4, 8, generator=gen), torch.randn(50, 8, generator=gen)
    d, i = ops.filtered_knn(q, x, torch.zeros(50, dtype=torch.bool), 3, metric)
    assert (i == -1).all() and torch.isinf(d).all() and (d > 0).all()
    d, i = ops.filtered_knn(q, x, torch.zeros(4, 50, dtype=torch.uint8), 3, metric)
    assert (i == -1).all() and torch.isinf(d).all()
    d, i = ops.filtered_knn(q, torch.empty(0, 8), None, 2, metric)
    assert d.shape == (4, 2) and (i == -1).all() and torch.isinf(d).all()
    d, i = ops.filtered_knn(q, torch.empty(0, 8), torch.empty(4, 0, dtype=torch.bool), 2, metric)
    assert (i == -1).all()
    d, i = ops.filtered_knn(torch.empty(0, 8), x, None, 2, metric)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def test_k_larger_than_matches_pads(gen):
    q, x = int_vectors(6, 5, gen), int_vectors(40, 5, gen)
    mask = torch.zeros(6, 40, dtype=torch.bool)
    for i in range(6):
        mask[i, torch.randperm(40, generator=gen)[:i]] = True  # query i has i matches
    d, ids = ops.filtered_knn(q, x, mask, 8, "l2")
    for i in range(6):
        assert (ids[i, :i] >= 0).all() and (ids[i, i:] == -1).all()
        assert torch.isinf(d[i, i:]).all() and torch.isfinite(d[i, :i]).all()
    want_d, want_i = reference(q, x, mask, 8, "l2")
    assert torch.equal(ids, want_i)


def test_many_queries_few_rows_and_few_queries_many_rows(gen):
    # exercises both the query-block and the row-chunk parallel splits
    for nq, n in ((300, 11), (1, 5000), (3, 2500)):
        q, x = int_vectors(nq, 12, gen), int_vectors(n, 12, gen)
        mask = torch.rand(n, generator=gen) < 0.7
        d, i = ops.filtered_knn(q, x, mask, 13, "ip")
        assert torch.equal(i, reference(q, x, mask, 13, "ip")[1])


def test_non_contiguous_inputs(gen):
    qq = int_vectors(9, 40, gen).t()[::2]  # (20, 9) view with odd strides
    x = int_vectors(30, 18, gen)[:, ::2]
    mask = (torch.rand(30, 2, generator=gen) < 0.5)[:, 0]
    assert not qq.is_contiguous() and not x.is_contiguous() and not mask.is_contiguous()
    d, i = ops.filtered_knn(qq, x, mask, 4, "l2")
    assert torch.equal(i, reference(qq, x, mask, 4, "l2")[1])


def _raw(q, x, k, metric, **kw):
    nq, d = q.shape
    n = x.shape[0]
    out_d = torch.full((nq, k), float("nan"))
    out_i = torch.full((nq, k), -7, dtype=torch.int64)
    C.exact_knn(C.DEVICE_CPU, C.DTYPE_CODES["float32"], ptr(q), nq, ptr(x), n, d, ops.knn.METRICS[metric], k,
                out_dist=ptr(out_d), out_ids=ptr(out_i), **kw)
    return out_d, out_i


def test_kernel_writes_every_output_element(gen):
    q, x = int_vectors(17, 10, gen), int_vectors(300, 10, gen)
    mask = (torch.rand(300, generator=gen) < 0.02).to(torch.uint8)
    for kw, m in (({}, None), ({"mask": ptr(mask)}, mask)):
        d, i = _raw(q, x, 12, "l2", **kw)
        want_d, want_i = reference(q, x, m, 12, "l2")
        assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


def test_candidate_lists_and_row_ids(gen):
    q, x = int_vectors(9, 6, gen), int_vectors(120, 6, gen)
    lists = [torch.randint(0, 120, (int(torch.randint(0, 30, (1,), generator=gen)),), generator=gen) for _ in range(9)]
    lists[0] = torch.tensor([5, 5, 5, 7], dtype=torch.int64)  # duplicates are ignored
    lists[1] = torch.empty(0, dtype=torch.int64)
    offsets = torch.tensor([0] + [len(v) for v in lists]).cumsum(0)
    rows = torch.cat(lists)
    row_ids = torch.randperm(10_000, generator=gen)[:120] * 1_000_003  # 64-bit user ids
    d, i = _raw(q, x, 5, "ip", cand_offsets=ptr(offsets), cand_rows=ptr(rows), row_ids=ptr(row_ids))
    mask = torch.zeros(9, 120, dtype=torch.bool)
    for r, v in enumerate(lists):
        mask[r, v] = True
    want_d, want_i = reference(q, x, mask, 5, "ip", row_ids=row_ids)
    assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


def _groups_filter(gen, n, nq, groups, max_rows, max_groups, shared_group, no_groups):
    """Random row groups (ascending rows, overlapping, group 0 empty) and each query's distinct
    groups: up to max_groups random ones plus `shared_group`, none for query `no_groups`.
    Returns the exact_knn keywords (tensors kept in the dict) and the (nq, n) allowed mask."""
    rows = [torch.sort(torch.randperm(n, generator=gen)[: int(torch.randint(0, max_rows + 1, (1,), generator=gen))])[0]
            for _ in range(groups)]
    rows[0] = torch.empty(0, dtype=torch.int64)
    per_query = []
    for qi in range(nq):
        gs = torch.randperm(groups, generator=gen)[: int(torch.randint(0, max_groups + 1, (1,), generator=gen))]
        if shared_group not in gs.tolist():
            gs = torch.cat([gs, torch.tensor([shared_group])])
        per_query.append(torch.empty(0, dtype=torch.int64) if qi == no_groups else gs)
    mask = torch.zeros(nq, n, dtype=torch.bool)
    for qi, gs in enumerate(per_query):
        for g in gs.tolist():
            mask[qi, rows[g]] = True
    kw = {"group_offsets": torch.tensor([0] + [len(r) for r in rows]).cumsum(0), "group_rows": torch.cat(rows),
          "query_group_offsets": torch.tensor([0] + [len(g) for g in per_query]).cumsum(0),
          "query_groups": torch.cat(per_query)}
    return kw, mask


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 7, 40, 129])
@pytest.mark.parametrize("ids", ["rows", "rising", "shuffled"])
def test_row_groups_match_the_reference(metric, k, ids, gen):
    """Each query may return the rows of its groups (partitions): each group's queries meet its
    rows in the shared-row-list kernel and the lists merge per query (a row in two of a query's
    groups counts once). Every query shares group 5 (300 queries: past a 256-query block);
    query 3 lists no group."""
    q, x = int_vectors(300, 19, gen), int_vectors(700, 19, gen)
    kw, mask = _groups_filter(gen, 700, 300, 23, 90, 4, shared_group=5, no_groups=3)
    row_ids = {"rows": None, "rising": torch.arange(700) * 3 + 11,
               "shuffled": torch.randperm(700, generator=gen) * 1_000_003}[ids]
    extra = {} if row_ids is None else {"row_ids": ptr(row_ids)}
    d, i = _raw(q, x, k, metric, groups=23, **{name: ptr(v) for name, v in kw.items()}, **extra)
    want_d, want_i = reference(q, x, mask, k, metric, row_ids=row_ids)
    assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


def test_row_groups_are_checked(gen):
    q, x = int_vectors(2, 3, gen), int_vectors(10, 3, gen)
    t = torch.tensor

    def run(group_offsets, group_rows, query_group_offsets, query_groups, groups=2, **more):
        arrays = [t(a) for a in (group_offsets, group_rows, query_group_offsets, query_groups)]  # alive for the call
        return _raw(q, x, 1, "l2", groups=groups, group_offsets=ptr(arrays[0]), group_rows=ptr(arrays[1]),
                    query_group_offsets=ptr(arrays[2]), query_groups=ptr(arrays[3]), **more)

    run([0, 2, 3], [1, 4, 9], [0, 1, 2], [0, 1])  # valid
    with pytest.raises(ValueError, match="group_rows: expected strictly ascending rows"):
        run([0, 2, 3], [4, 1, 9], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"group_rows: expected strictly ascending rows in \[0, 9\]"):
        run([0, 2, 3], [1, 10, 9], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="query_groups: expected distinct groups"):
        run([0, 2, 3], [1, 4, 9], [0, 2, 2], [1, 1])
    with pytest.raises(ValueError, match=r"query_groups: expected distinct groups in \[0, 1\]"):
        run([0, 2, 3], [1, 4, 9], [0, 1, 2], [0, 2])
    with pytest.raises(ValueError, match="group_offsets: expected non-decreasing"):
        run([0, 3, 2], [1, 4, 9], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="query_group_offsets: expected filter.query_group_offsets.0. = 0"):
        run([0, 2, 3], [1, 4, 9], [1, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="at most one of a mask, candidate lists and row groups"):
        mask = torch.ones(10, dtype=torch.uint8)
        run([0, 2, 3], [1, 4, 9], [0, 1, 2], [0, 1], mask=ptr(mask))


@pytest.mark.parametrize("k", [1, 10, 32, 33, 64, 65, 129])
def test_list_lengths_on_both_sides_of_the_vector_lanes(k, gen):
    # Lists of up to 64 hits (32 with SSE2) live in vector lanes (one lane per query), longer
    # ones in buffers (test_knn_long_lists.py drives those harder);
    # 37 queries leave a partly filled lane group at every vector width.
    q, x = int_vectors(37, 19, gen), int_vectors(389, 19, gen)
    shared = torch.rand(389, generator=gen) < 0.6
    per_query = torch.rand(37, 389, generator=gen) < 0.5
    for metric in ("l2", "ip"):
        for mask in (None, shared, per_query):
            d, i = ops.filtered_knn(q, x, mask, k, metric)
            want_d, want_i = reference(q, x, mask, k, metric)
            assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


@pytest.mark.parametrize("k", [3, 40, 150])
def test_ties_go_to_the_smaller_user_id_whatever_the_row_order(k, gen):
    # Rows repeat 6 base vectors, so every distance ties 40 ways. Ids that rise with the row
    # (gaps allowed) break ties in vector form; shuffled ids compare ids lane by lane; k = 150
    # takes the buffers.
    base = int_vectors(6, 9, gen)
    x = base.repeat(40, 1)
    q = int_vectors(21, 9, gen)
    mask = (torch.rand(240, generator=gen) < 0.8).to(torch.uint8)
    rising = torch.arange(240) * 7 + 3
    shuffled = torch.randperm(240, generator=gen) * 1_000_003
    for row_ids in (rising, shuffled):
        for kw, m in (({}, None), ({"mask": ptr(mask)}, mask)):
            d, i = _raw(q, x, k, "l2", row_ids=ptr(row_ids), **kw)
            want_d, want_i = reference(q, x, m, k, "l2", row_ids=row_ids)
            assert torch.equal(i, want_i) and torch.equal(d.double(), want_d)


@pytest.mark.parametrize("k", [30, 100, 130])
def test_a_lone_late_row_enters_wherever_it_sits_in_a_strip(k):
    # Distances grow with the row, so once the lists are full no row can enter, but for one
    # close row placed at every offset of a 12-row strip (lanes for k = 30, buffers for 100, 130).
    x = (1000 + torch.arange(264, dtype=torch.float32))[:, None]
    q = torch.zeros(3, 1)
    for close in range(240, 264):
        xc = x.clone()
        xc[close] = 0.5
        d, i = _raw(q, xc, k, "l2")
        assert (i[:, 0] == close).all() and torch.equal(i[:, 1:], torch.arange(k - 1).expand(3, k - 1))


def test_rows_at_infinite_distance_come_before_padding(gen):
    # A row so far away that its squared distance overflows to +inf is still a match: it is
    # returned (with +inf) ahead of the -1 padding, for lists in lanes and in buffers alike.
    x = int_vectors(140, 4, gen)
    x[13] = 1e30
    q = int_vectors(5, 4, gen)
    for k in (145, 150):  # lanes for 20 rows (k = 25, 30), buffers for 140
        for rows in (20, 140):
            d, i = _raw(q, x[:rows], k - 140 + rows, "l2")
            assert (i[:, rows - 1] == 13).all() and torch.isinf(d[:, rows - 1]).all()
            assert (i[:, rows:] == -1).all() and torch.isfinite(d[:, : rows - 1]).all()


def test_cpp_boundary_validation(gen):
    q, x = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="k: expected a positive"):
        C.exact_knn(0, 0, ptr(q), 2, ptr(x), 4, 3, 1, 0)
    with pytest.raises(ValueError, match="metric"):
        C.exact_knn(0, 0, ptr(q), 2, ptr(x), 4, 3, 5, 1)
    with pytest.raises(ValueError, match="out_dist"):
        C.exact_knn(0, 0, ptr(q), 2, ptr(x), 4, 3, 1, 1)
    with pytest.raises(ValueError, match="nq"):
        C.exact_knn(0, 0, ptr(q), -1, ptr(x), 4, 3, 1, 1)
    with pytest.raises(ValueError, match="database"):
        C.exact_knn(0, 0, ptr(q), 2, 0, 4, 3, 1, 1)
    with pytest.raises(TypeError, match="queries"):
        C.exact_knn(0, C.DTYPE_CODES["int64"], ptr(q), 2, ptr(x), 4, 3, 1, 1, out_dist=ptr(q), out_ids=ptr(q))
    offsets = torch.tensor([0, 2, 1])
    rows = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        _raw(q, x, 1, "l2", cand_offsets=ptr(offsets), cand_rows=ptr(rows))
    offsets = torch.tensor([0, 1, 2])
    rows = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=r"cand_rows: expected values in \[0, 3\]"):
        _raw(q, x, 1, "l2", cand_offsets=ptr(offsets), cand_rows=ptr(rows))
    mask = torch.ones(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at most one of a mask, candidate lists and row groups"):
        _raw(q, x, 1, "l2", mask=ptr(mask), cand_offsets=ptr(offsets), cand_rows=ptr(rows))


def test_python_validation(gen):
    q, x = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="queries"):
        ops.filtered_knn(np.zeros((2, 3)), x)
    with pytest.raises(ValueError, match="queries: expected a 2-D"):
        ops.filtered_knn(torch.randn(3), x)
    with pytest.raises(TypeError, match="queries: expected dtype"):
        ops.filtered_knn(q.half(), x.half())
    with pytest.raises(TypeError, match="database: expected dtype"):
        ops.filtered_knn(q, x.double())
    with pytest.raises(ValueError, match="database: expected 3 columns"):
        ops.filtered_knn(q, torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"allow_mask: expected shape \(4,\) or \(2, 4\)"):
        ops.filtered_knn(q, x, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="allow_mask: expected dtype"):
        ops.filtered_knn(q, x, torch.ones(4))
    for k in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="k: expected a positive int"):
            ops.filtered_knn(q, x, None, k)
    with pytest.raises(ValueError, match="metric"):
        ops.filtered_knn(q, x, None, 2, "hamming")


def test_nan_rows_are_never_returned(gen):
    q, x = torch.randn(3, 4, generator=gen), torch.randn(10, 4, generator=gen)
    x[2] = float("nan")
    for metric in METRICS:
        d, i = ops.filtered_knn(q, x, None, 10, metric)
        assert (i != 2).all() and (i[:, -1] == -1).all() and torch.isfinite(d[:, :9]).all()


def test_opcheck(gen):
    q, x = torch.randn(5, 6, generator=gen), torch.randn(20, 6, generator=gen)
    for mask in (None, torch.rand(20, generator=gen) < 0.5, torch.rand(5, 20, generator=gen) < 0.5):
        torch.library.opcheck(torch.ops.affectkit.filtered_knn.default, (q, x, mask, 3, "l2"))
        torch.library.opcheck(torch.ops.affectkit.filtered_knn.default, (q.double(), x.double(), mask, 4, "cosine"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, gen):
    torch._dynamo.reset()

    def retrieve(q, x, mask):
        d, i = ops.filtered_knn(q * 2.0, x, mask, 4, "ip")
        return d.sum(1), i

    fn = torch.compile(retrieve, fullgraph=True, dynamic=True, backend=backend)
    for nq, n in ((3, 30), (7, 41)):
        q, x = int_vectors(nq, 5, gen), int_vectors(n, 5, gen)
        mask = torch.rand(nq, n, generator=gen) < 0.5
        got = fn(q, x, mask)
        want = retrieve(q, x, mask)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_matches_cpu(dtype, metric, gen):
    q, x = int_vectors(37, 40, gen), int_vectors(3001, 40, gen)
    for mask in (None, torch.rand(3001, generator=gen) < 0.01, torch.rand(37, 3001, generator=gen) < 0.5):
        got_d, got_i = ops.filtered_knn(q.cuda().to(dtype), x.cuda().to(dtype), None if mask is None else mask.cuda(), 10, metric)
        if metric == "cosine":
            check_close(got_d.cpu().float(), got_i.cpu(), q, x, mask, 10, metric, 2e-3)
        else:
            want_d, want_i = reference(q, x, mask, 10, metric)
            assert torch.equal(got_i.cpu(), want_i)
            assert torch.equal(got_d.cpu().double(), want_d)


@requires_cuda
def test_cuda_padding_and_large_k(gen):
    q, x = torch.randn(4, 8, device="cuda"), torch.randn(50, 8, device="cuda")
    d, i = ops.filtered_knn(q, x, torch.zeros(50, dtype=torch.bool, device="cuda"), 3, "l2")
    assert (i == -1).all() and torch.isinf(d).all()
    d, i = ops.filtered_knn(q, x, None, 200, "l2")
    want_d, want_i = reference(q.cpu(), x.cpu(), None, 200, "l2")
    assert torch.equal(i.cpu() == -1, want_i == -1)
    assert torch.allclose(d.cpu().double()[:, :50], want_d[:, :50], atol=1e-4)


def test_kernels_without_avx512_match_too(tmp_path):
    # The CPU picks 64-byte kernels on AVX-512 machines; run the 32-byte (AVX2/default) ones
    # in a child process so both paths are checked wherever the suite runs.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import numpy as np, torch
        import affectkit.ops as ops
        from affectkit.index import EmbeddingIndex
        g = torch.Generator().manual_seed(7)
        for dtype in (torch.float32, torch.float64):
            q = torch.randint(-3, 4, (41, 23), generator=g).to(dtype)
            x = torch.randint(-3, 4, (509, 23), generator=g).to(dtype)
            mask = torch.rand(509, generator=g) < 0.5
            d, i = ops.filtered_knn(q, x, mask, 7, "l2")
            D = ((q.double()[:, None] - x.double()[None]) ** 2).sum(-1).masked_fill(~mask, float("inf"))
            want = torch.sort(D, dim=1, stable=True)
            assert torch.equal(i, want.indices[:, :7]) and torch.equal(d.double(), want.values[:, :7])
        rng = np.random.default_rng(0)
        xs = rng.standard_normal((3000, 40)).astype(np.float32)
        index = EmbeddingIndex(40, "l2", graph_min_rows=0)
        index.add(xs)
        index.build_graph()
        exact = index.search(xs[:50] + 0.01, 10, mode="exact")[1]
        approx = index.search(xs[:50] + 0.01, 10, mode="approx")[1]
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
        assert rec >= 0.95, rec
        print("ok")
        """
    )
    env = dict(__import__("os").environ, AFFECTKIT_NO_AVX512="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def _reference_by_query_chunks(q, x, mask, k, metric, step=8):
    """reference() a few queries at a time (distances64 broadcasts (nq, n, d) for l2)."""
    parts_d, parts_i = [], []
    for s in range(0, q.shape[0], step):
        m = mask if mask is None or mask.dim() == 1 else mask[s : s + step]
        d, i = reference(q[s : s + step], x, m, k, metric)
        parts_d.append(d)
        parts_i.append(i)
    return torch.cat(parts_d), torch.cat(parts_i)


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [16, 48, 384])
def test_cuda_float16_tensor_core_path_awkward_sizes(metric, d, gen):
    # float16 with d % 16 == 0 runs the tensor-core kernel (exact_knn_tc.cu): 128-row tiles,
    # 64-column stages, query blocks of 32/64/128, row chunks merged afterwards.
    for nq, n, k in ((1, 1, 1), (1, 127, 256), (37, 4099, 10), (130, 127, 256), (37, 1, 10),
                     (1, 4099, 10), (130, 4099, 256)):
        q, x = int_vectors(nq, d, gen), int_vectors(n, d, gen)
        x[0] = 0  # zero rows: orthogonal to everything under cosine
        if nq > 1:
            q[-1] = 0
        per_query = torch.rand(nq, n, generator=gen) < 0.3
        per_query[0] = False  # a query with nothing allowed
        masks = (None, torch.rand(n, generator=gen) < 0.5, torch.zeros(n, dtype=torch.bool), per_query)
        for mask in masks:
            got_d, got_i = ops.filtered_knn(q.cuda().half(), x.cuda().half(),
                                            None if mask is None else mask.cuda(), k, metric)
            assert got_d.dtype == torch.float16 and got_d.shape == (nq, k) and got_i.shape == (nq, k)
            got_d, got_i = got_d.cpu(), got_i.cpu()
            if metric == "cosine":
                check_close(got_d.float(), got_i, q, x, mask, k, metric, 2e-3)
            else:
                want_d, want_i = _reference_by_query_chunks(q, x, mask, k, metric)
                assert torch.equal(got_i, want_i), (nq, n, k, d)
                assert torch.equal(got_d.double(), want_d.half().double()), (nq, n, k, d)


@requires_cuda
def test_cuda_float16_unaligned_or_odd_width_falls_back(gen):
    # d % 16 != 0 and a database starting 2 bytes into its storage use the scalar kernel
    for d, offset in ((40, 0), (24, 1)):
        q, x = int_vectors(19, d, gen), int_vectors(700, d, gen)
        store = torch.zeros(700 * d + offset, dtype=torch.float16, device="cuda")
        xs = store[offset:].view(700, d)
        xs.copy_(x.half())
        mask = torch.rand(700, generator=gen) < 0.5
        got_d, got_i = ops.filtered_knn(q.cuda().half(), xs, mask.cuda(), 7, "ip")
        want_d, want_i = reference(q, x, mask, 7, "ip")
        assert torch.equal(got_i.cpu(), want_i)
        assert torch.equal(got_d.cpu().double(), want_d.half().double())


# --- float16 tensor-core path with a shared mask: the allowed rows are compacted on the device
# (exact_knn_tc.cu) and only they are scored; chunks are derived from the device-side count.


def _distances64_fast(q, x, metric):
    """distances64 without l2's (nq, n, d) broadcast: |q|^2 + |x|^2 - 2 q.x in float64, exact
    for the small-integer (or +-1) entries used here."""
    if metric != "l2":
        return distances64(q, x, metric)
    q, x = q.double(), x.double()
    return (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * (q @ x.T)


def _topk64(D, mask, k):
    """reference() for precomputed float64 distances D (nq, n), all queries at once: the stable
    sort keeps the smaller row index first on ties; pads with (inf, -1)."""
    nq, n = D.shape
    if mask is not None:
        D = D.masked_fill(~mask.bool().expand(nq, n), math.inf)
    vals, idx = torch.sort(D, dim=1, stable=True)
    m = min(k, n)
    out_d = torch.full((nq, k), math.inf, dtype=torch.float64)
    out_i = torch.full((nq, k), -1, dtype=torch.int64)
    out_d[:, :m] = vals[:, :m]
    out_i[:, :m] = idx[:, :m]
    out_i[torch.isinf(out_d)] = -1
    return out_d, out_i


def _pm1_rows(n, d, nnz, gen):
    """Rows with exactly nnz entries +-1 (nnz in 1, 4, 16, 64): their unit rows are exact in
    float16, so cosine scores are exact multiples of a power of two on every path."""
    pos = torch.rand(n, d, generator=gen).topk(nnz, dim=1).indices
    sign = torch.randint(0, 2, (n, nnz), generator=gen).float() * 2 - 1
    return torch.zeros(n, d).scatter_(1, pos, sign)


def _exact_vectors(nq, n, d, metric, gen):
    """Data whose float16 results are exact: small integers (ip, l2), or +-1 rows with 16
    (database) and 4 (queries) nonzeros, norms 4 and 2 (cosine)."""
    if metric == "cosine":
        return _pm1_rows(nq, d, 4, gen), _pm1_rows(n, d, 16, gen)
    return int_vectors(nq, d, gen), int_vectors(n, d, gen)


def _shared_masks(n, nq, gen):
    one = torch.zeros(n, dtype=torch.bool)
    one[int(torch.randint(0, n, (1,), generator=gen))] = True
    few = torch.zeros(n, dtype=torch.bool)
    few[torch.randperm(n, generator=gen)[:3]] = True  # fewer allowed rows than k = 10
    # uint8: every nonzero value allows the row
    half = (torch.rand(n, generator=gen) < 0.5).to(torch.uint8)
    half *= torch.randint(1, 256, (n,), generator=gen, dtype=torch.uint8)
    return [
        ("none_allowed", torch.zeros(n, dtype=torch.bool)),
        ("one_allowed", one),
        ("fewer_than_k", few),
        ("1%", torch.rand(n, generator=gen) < 0.01),
        ("50%_uint8", half),
        ("all_allowed", torch.ones(n, dtype=torch.bool)),
        ("no_mask", None),  # unchanged paths, same sizes
        ("per_query", torch.rand(nq, n, generator=gen) < 0.3),
    ]


def test_fast_reference_helpers_match_reference(gen):
    # the helpers the CUDA tests below rely on agree with reference() (runs without a GPU)
    for metric in METRICS:
        for nq, n, d in ((1, 1, 16), (7, 129, 48), (5, 300, 16)):
            q, x = _exact_vectors(nq, n, d, metric, gen)
            x[n // 2:] = x[: n - n // 2].clone()  # duplicate rows: ties
            D = _distances64_fast(q, x, metric)
            assert torch.equal(D, distances64(q, x, metric))
            for _, mask in _shared_masks(n, nq, gen):
                for k in (1, 10, n + 5):
                    got_d, got_i = _topk64(D, mask, k)
                    want_d, want_i = reference(q, x, mask, k, metric)
                    assert torch.equal(got_i, want_i) and torch.equal(got_d, want_d)
    q = _pm1_rows(9, 48, 4, gen)
    assert torch.equal(q.abs().sum(1), torch.full((9,), 4.0))


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [16, 48, 384])
def test_cuda_float16_shared_filter_compacted_rows_awkward_sizes(metric, d, gen):
    # every result is exact here (cosine included), so ids and distances must match exactly
    for n in (1, 127, 129, 1000, 40000):
        for nq in (1, 7, 130):
            q, x = _exact_vectors(nq, n, d, metric, gen)
            D = _distances64_fast(q, x, metric)
            qc, xc = q.cuda().half(), x.cuda().half()
            for name, mask in _shared_masks(n, nq, gen):
                want_d, want_i = _topk64(D, mask, 256)
                mc = None if mask is None else mask.cuda()
                for k in (1, 10, 256):
                    got_d, got_i = ops.filtered_knn(qc, xc, mc, k, metric)
                    ctx = (name, n, nq, d, k)
                    assert got_d.dtype == torch.float16 and got_d.shape == (nq, k), ctx
                    assert got_i.shape == (nq, k), ctx
                    assert torch.equal(got_i.cpu(), want_i[:, :k]), ctx
                    assert torch.equal(got_d.cpu().double(), want_d[:, :k].half().double()), ctx


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_float16_shared_filter_ties_go_to_smaller_id(metric, gen):
    # 23 distinct +-1 rows repeated over the database: the k best are long runs of exact ties
    # spread over many chunks; the smaller allowed row index must win every tie
    d = 48
    for n, nq in ((129, 7), (40000, 1), (40000, 130)):
        base = _pm1_rows(23, d, 16, gen)
        x = base[torch.randint(0, 23, (n,), generator=gen)]
        q = _pm1_rows(nq, d, 4, gen)
        D = _distances64_fast(q, x, metric)
        qc, xc = q.cuda().half(), x.cuda().half()
        for frac in (0.01, 0.5, 1.0):
            mask = torch.rand(n, generator=gen) < frac
            for k in (10, 256):
                want_d, want_i = _topk64(D, mask, k)
                if n >= 40000:  # ~1700 copies of each row (17 at 1 %): the test really has ties
                    assert (want_d[:, 0] == want_d[:, 1]).all()
                got_d, got_i = ops.filtered_knn(qc, xc, mask.cuda(), k, metric)
                assert torch.equal(got_i.cpu(), want_i), (n, nq, frac, k)
                assert torch.equal(got_d.cpu().double(), want_d.half().double()), (n, nq, frac, k)


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_float16_shared_filter_graph_replay_follows_new_mask(metric, gen):
    # the compacted row count stays on the device: one captured call serves any selectivity
    nq, n, d, k = 33, 5000, 64, 10
    q, x = _exact_vectors(nq, n, d, metric, gen)
    qc, xc = q.cuda().half(), x.cuda().half()
    mask = torch.rand(n, generator=gen).cuda() < 0.5

    def call():
        return ops.filtered_knn(qc, xc, mask, k, metric)

    graph, captured = capture_cuda_graph(call)
    for frac in (0.01, 0.5, 0.0, 1.0, 0.001):
        new_mask = torch.rand(n, generator=gen) < frac
        if frac == 0.001:  # new queries too
            q = _exact_vectors(nq, n, d, metric, gen)[0]
            qc.copy_(q.half())
        mask.copy_(new_mask)
        graph.replay()
        torch.cuda.synchronize()
        want_d, want_i = _topk64(_distances64_fast(q, x, metric), new_mask, k)
        assert torch.equal(captured[1].cpu(), want_i), frac
        assert torch.equal(captured[0].cpu().double(), want_d.half().double()), frac
        eager_d, eager_i = call()
        assert torch.equal(eager_i, captured[1]) and torch.equal(eager_d, captured[0])
