"""EmbeddingIndex(device="cuda"): exact searches on the GPU give the CPU index's results."""

import numpy as np
import pytest
import torch

from affectkit import _C
from affectkit.index import EmbeddingIndex
from _support import requires_cuda


def test_device_is_validated():
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        EmbeddingIndex(8, device="tpu")
    if not (_C.build_info()["cuda_compiled"] and torch.cuda.is_available()):
        with pytest.raises(ValueError, match="device: 'cuda' needs a visible CUDA GPU"):
            EmbeddingIndex(8, device="cuda")
    assert EmbeddingIndex(8).device == "cpu"


def _pair(metric, dtype, rng, n=3001, dim=48):
    # Small integers: every product and sum is exact in float32 (and float16 storage), so the
    # GPU and CPU scans must agree on ids and distances exactly (l2, ip).
    x = rng.integers(-4, 5, size=(n, dim)).astype(np.float32)
    attrs = {"label": rng.integers(0, 6, size=n), "ts": rng.uniform(0, 100, size=n),
             "tags": [set(rng.choice(5, size=rng.integers(0, 3), replace=False).tolist()) for _ in range(n)]}
    ids = rng.permutation(10 * n)[:n]
    cpu, gpu = EmbeddingIndex(dim, metric, dtype), EmbeddingIndex(dim, metric, dtype, device="cuda")
    for index in (cpu, gpu):
        index.add(x, attrs, ids=ids)
    return cpu, gpu, x, ids


def _same(cpu, gpu, q, k, metric, **kw):
    want_d, want_i = cpu.search(q, k, mode="exact", **kw)
    got_d, got_i = gpu.search(q, k, **kw)
    assert got_d.shape == got_i.shape == (len(q), k)
    if metric == "cosine":  # rounding differs between the two scans: distances to a tolerance
        np.testing.assert_allclose(got_d, want_d, atol=2e-3)
        np.testing.assert_array_equal(got_i == -1, want_i == -1)
        return
    # Integer data: distances agree exactly. Equal distances may come in another order (the
    # GPU breaks ties by stored row, the CPU by id), and a tie at the end of the list may be
    # cut differently, so ids are compared as sets below each row's last distance, and every
    # returned id must really be at its reported distance.
    np.testing.assert_array_equal(got_d, want_d)
    for row in range(len(q)):
        last = want_d[row][np.isfinite(want_d[row])].max(initial=-np.inf)
        below = want_d[row] < last
        assert set(got_i[row][below]) == set(want_i[row][below])
        found = got_i[row][got_i[row] >= 0]
        assert len(set(found)) == len(found)
        vec = cpu._vectors[cpu._find_rows(found)].astype(np.float64)
        qd = q[row].astype(np.float64)
        true = ((vec - qd) ** 2).sum(1) if metric == "l2" else -(vec @ qd)
        np.testing.assert_array_equal(true, got_d[row][: len(found)])


@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_cuda_index_matches_cpu_index(metric, dtype):
    rng = np.random.default_rng()
    cpu, gpu, x, ids = _pair(metric, dtype, rng)
    q = rng.integers(-4, 5, size=(37, x.shape[1])).astype(np.float32)
    plan = gpu.explain({"label": 2})
    assert plan["mode"] == "exact" and "GPU" in plan["reason"]
    for where in (None, {"label": 2}, {"label": [0, 5], "ts": (10, 60)}, {"ts": (99.99, None)}):
        _same(cpu, gpu, q, 10, metric, where=where)
    _same(cpu, gpu, q, 1, metric, where=[{"label": i % 6} for i in range(37)])  # a filter per query
    _same(cpu, gpu, q[:1], 300, metric)  # k above the GPU's 256: the CPU scan answers
    # Removals and later additions are seen by the next GPU search.
    for index in (cpu, gpu):
        index.remove(ids[:500])
        index.add(x[:7] + 1, {"label": np.full(7, 2), "ts": np.zeros(7), "tags": [set()] * 7}, ids=10 * len(x) + np.arange(7))
    _same(cpu, gpu, q, 10, metric, where={"label": 2})
    # Nothing passes: padding.
    d, i = gpu.search(q[:3], 4, where={"ts": (1000, None)})
    assert (i == -1).all() and np.isinf(d).all()


@requires_cuda
def test_cuda_index_save_load_and_torch_queries(tmp_path):
    rng = np.random.default_rng()
    cpu, gpu, x, _ = _pair("l2", "float16", rng, n=257, dim=16)
    gpu.save(tmp_path / "i.akx")
    loaded = EmbeddingIndex.load(tmp_path / "i.akx", device="cuda")
    assert loaded.device.startswith("cuda")
    q = torch.from_numpy(rng.integers(-4, 5, size=(5, 16)).astype(np.float32)).cuda()  # GPU queries
    for index in (gpu, loaded):
        d, i = index.search(q, 3, where={"label": 1})
        want_d, _ = cpu.search(q.cpu().numpy(), 3, where={"label": 1}, mode="exact")
        np.testing.assert_array_equal(d, want_d)
