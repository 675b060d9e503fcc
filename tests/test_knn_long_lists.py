"""Long k-NN lists (k past the 128 that fit in vector lanes): the CPU scan keeps them in
TopKBuffer (csrc/knn/topk.h), which appends candidates within a bound and cuts back to a
sampled distance, or to the exact k-th hit, when the buffer fills. These tests drive many
cuts: thousands of rows a query, rows in the order that makes every row enter, and
distances tied hundreds of ways (where a sampled cut would drop too little and the exact
one must take over). Results must equal the float64 reference exactly, ties by id."""

import numpy as np
import pytest
import torch

import affectkit.ops as ops
from affectkit.ops._bridge import ptr

from test_exact_knn import _groups_filter, _raw, int_vectors, reference

N = 4001  # rows: several chunks of a work item, none a multiple of a 96-row tile


def _check(got, want):
    (d, i), (wd, wi) = got, want
    assert torch.equal(i, wi), (i != wi).nonzero()[:5]
    assert torch.equal(d.double(), wd)


@pytest.mark.parametrize("k", [129, 700, 1999])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_query_dense", "per_query_sparse"])
@pytest.mark.parametrize("ids", ["rows", "shuffled"])
def test_long_lists_match_the_reference(k, mask_kind, ids, gen):
    # Integer entries in [-2, 2]: products are exact in float32 and distances tie many ways.
    # Shuffled ids make a late row at the bound's distance win its tie against kept ones.
    q, x = int_vectors(19, 5, gen, -2, 3), int_vectors(N, 5, gen, -2, 3)
    mask = {"none": None, "shared": torch.rand(N, generator=gen) < 0.7,
            "per_query_dense": torch.rand(19, N, generator=gen) < 0.6,
            "per_query_sparse": torch.rand(19, N, generator=gen) < 0.04}[mask_kind]
    row_ids = None if ids == "rows" else torch.randperm(N, generator=gen) * 1_000_003
    for metric in ("l2", "ip"):
        if row_ids is None:  # through the op, which picks the kernel from the mask
            got = ops.filtered_knn(q, x, mask, k, metric)
        else:
            extra = {"row_ids": ptr(row_ids)}
            if mask is not None:
                m = mask.to(torch.uint8).contiguous()
                extra.update(mask=ptr(m), mask_per_query=m.dim() == 2)
            got = _raw(q, x, k, metric, **extra)
        _check(got, reference(q, x, mask, k, metric, row_ids=row_ids))


def test_a_sampled_bound_one_short_of_k_is_not_taken():
    # One query, k = 300, 700 rows (one chunk): the buffer (600 hits) is cut after the first
    # 600 rows. Its sample is every 600/64-th hit, and the sampled distance it aims at (the
    # 41st smallest sampled) is placed so that exactly 299 hits lie at or below it: the cut
    # must not take it (299 < k), or the 300th neighbour is lost. Row r's distance is its value
    # (inner product with q = -1: exact in float32).
    k, size = 300, 600
    sampled = sorted({i * size // 64 for i in range(64)})
    rest = [p for p in range(size) if p not in set(sampled)]
    values = np.empty(size)
    order = np.random.default_rng(0).permutation(64)  # sampled distances in no row order
    values[np.array(sampled)[order]] = 1000 + 10 * np.arange(64)  # the 41st: 1400
    values[rest[:258]] = 1 + np.arange(258)  # 258 + 41 = 299 at or below 1400
    values[rest[258:]] = 5000 + np.arange(len(rest) - 258)
    x = torch.tensor(np.concatenate([values, 9000 + np.arange(100)]), dtype=torch.float32)[:, None]
    q = -torch.ones(1, 1)
    _check(_raw(q, x, k, "ip"), reference(q, x, None, k, "ip"))


@pytest.mark.parametrize("k", [130, 1000])
def test_rows_that_all_enter_and_rows_that_all_tie(k, gen):
    # Distances that fall along the rows: every row beats the bound, so the buffer fills and is
    # cut again and again. Then one distance for every row: no sampled distance drops anything,
    # and the smallest ids must win.
    x = torch.arange(N, 0, -1, dtype=torch.float32)[:, None]
    q = torch.zeros(3, 1)
    row_ids = torch.randperm(N, generator=gen) * 1_000_003
    for xs in (x, torch.ones(N, 1)):
        for ids in (None, row_ids):
            extra = {} if ids is None else {"row_ids": ptr(ids)}
            _check(_raw(q, xs, k, "l2", **extra), reference(q, xs, None, k, "l2", row_ids=ids))


@pytest.mark.parametrize("k", [129, 900])
def test_long_candidate_lists_with_repeats(k, gen):
    # Per-query candidate lists naming rows more than once: each row is returned once.
    q, x = int_vectors(7, 6, gen), int_vectors(3000, 6, gen)
    lists = [torch.randint(0, 3000, (int(torch.randint(k // 2, 3 * k, (1,), generator=gen)),), generator=gen)
             for _ in range(7)]
    lists[0] = torch.cat([lists[0], lists[0][:50]])  # repeats, some after the list filled
    offsets = torch.tensor([0] + [len(v) for v in lists]).cumsum(0)
    rows = torch.cat(lists)
    row_ids = torch.randperm(3000, generator=gen) * 7 + 1
    mask = torch.zeros(7, 3000, dtype=torch.bool)
    for r, v in enumerate(lists):
        mask[r, v] = True
    got = _raw(q, x, k, "ip", cand_offsets=ptr(offsets), cand_rows=ptr(rows), row_ids=ptr(row_ids))
    _check(got, reference(q, x, mask, k, "ip", row_ids=row_ids))


@pytest.mark.parametrize("k", [129, 800])
def test_long_lists_from_overlapping_row_groups(k, gen):
    # Every query takes up to 3 of 8 overlapping groups of up to 900 rows, and group 1: a row
    # in two of them is returned once.
    q, x = int_vectors(40, 7, gen), int_vectors(2500, 7, gen)
    kw, mask = _groups_filter(gen, 2500, 40, 8, 900, 3, shared_group=1, no_groups=-1)
    for metric in ("l2", "ip"):
        got = _raw(q, x, k, metric, groups=8, **{name: ptr(v) for name, v in kw.items()})
        _check(got, reference(q, x, mask, k, metric))


def test_float64_long_lists(gen):
    q = torch.randn(11, 13, generator=gen, dtype=torch.float64)
    x = torch.randn(N, 13, generator=gen, dtype=torch.float64)
    for metric in ("l2", "ip", "cosine"):
        d, i = ops.filtered_knn(q, x, None, 1500, metric)
        wd, wi = reference(q, x, None, 1500, metric)
        assert torch.allclose(d, wd, rtol=1e-12, atol=1e-12)
        # Rounding may swap near-equal neighbours, never change the set reached.
        assert np.mean([len(set(a) & set(b)) / 1500 for a, b in zip(i.tolist(), wi.tolist())]) > 0.999
