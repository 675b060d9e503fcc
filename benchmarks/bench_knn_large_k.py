"""Exact k-NN with long result lists (k = 10 to 3,000), unfiltered, inner product.

Long lists serve re-ranking, label propagation and the partitions' own calibration
(python/affectkit/index/partitions.py asks for 3,001 neighbours of 256 sample rows). Data:
AFFECTKIT_KNN_FULL=1 takes 200,000 x 384 float32 rows and 256 queries (else 6,000 x 64 and
32 queries, for the test suite's smoke run), random normal. Impls:
    affectkit   affectkit.ops.filtered_knn (the blocked scan; lists past k = 64 in TopKBuffer)
    torch       one matrix product and torch.topk
    numpy       one matrix product, np.argpartition, then the k sorted
    faiss-flat  IndexFlatIP.search, when faiss-cpu is installed

Floor (full size): 2 * 256 * 200,000 * 384 = 39 GFLOP, ~0.1 s at the scan's ~200 GFLOP/s on
2 AVX-512 cores: the k = 10 time. What k adds is the list upkeep.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import affectkit.ops as ops

FULL = os.environ.get("AFFECTKIT_KNN_FULL") == "1"
N, D, NQ = (200_000, 384, 256) if FULL else (6_000, 64, 32)
KS = (10, 100, 1000, 3000)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(NQ, D, generator=g)


def _group(k):
    return f"knn_large_k k={k} {N}x{D} nq={NQ}"


def _torch_topk(x, q, k):
    return torch.topk(q @ x.T, k, dim=1).indices


def _numpy_topk(x, q, k):
    s = q @ x.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


@pytest.mark.parametrize("k", KS)
def bench_affectkit(bench, benchmark, data, k):
    x, q = data
    _, ids = bench(_group(k), "affectkit", ops.filtered_knn, q, x, None, k, "ip")
    # Random normal scores have no ties: the same k rows as torch's top-k.
    want = _torch_topk(x, q, k)
    assert all(set(a) == set(b) for a, b in zip(ids.tolist(), want.tolist()))


@pytest.mark.parametrize("k", KS)
def bench_torch(bench, benchmark, data, k):
    x, q = data
    bench(_group(k), "torch", _torch_topk, x, q, k)


@pytest.mark.parametrize("k", KS)
def bench_numpy(bench, benchmark, data, k):
    x, q = data
    bench(_group(k), "numpy", _numpy_topk, x.numpy(), q.numpy(), k)


@pytest.mark.parametrize("k", KS)
def bench_faiss_flat(bench, benchmark, data, k):
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional: pip install faiss-cpu)")
    x, q = data
    index = faiss.IndexFlatIP(D)
    index.add(x.numpy())
    bench(_group(k), "faiss-flat", index.search, q.numpy(), k)
