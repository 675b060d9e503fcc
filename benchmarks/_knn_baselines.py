"""Baselines shared by the filtered k-NN benchmarks: exact numpy/torch searches, and FAISS and
hnswlib graphs (optional: `pip install affectkit[bench-knn]`; absent ones skip with a reason).

Every search here answers "the k nearest rows passing `mask` (a boolean row mask)" with inner
product on unit vectors (cosine), returning row indices, so recall is comparable across them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

# Graph beam widths tried, cheapest first: steps of 1.25-1.5x, so that a baseline's "cheapest
# setting reaching the target recall" is not up to 2x too generous (16, 32, 64, ... gave FAISS
# efSearch 64, recall 0.986, at 50 % selectivity, where 40 reaches 0.95).
EF_SWEEP = (16, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
TARGET_RECALL = 0.95


def recall(got, want) -> float:
    """Mean fraction of each query's exact answer (ignoring -1 padding) found in `got`."""
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum()) for g, w in zip(got, want)]))


def numpy_gather(x, q, mask, k):
    """Gather the passing rows, one matrix product, argpartition: the simple exact baseline."""
    rows = np.flatnonzero(mask)
    scores = q @ x[rows].T
    kk = min(k, len(rows))
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
    return rows[np.take_along_axis(top, order, 1)]


def torch_masked(x, q, mask, k):
    """The stock PyTorch path: the full score matrix, masked_fill, topk."""
    scores = (q @ x.T).masked_fill_(~mask, float("-inf"))
    return scores.topk(k, dim=1).indices


def faiss_or_none():
    try:
        import faiss  # noqa: PLC0415 - optional benchmark dependency

        return faiss
    except ImportError:
        return None


def hnswlib_or_none():
    try:
        import hnswlib  # noqa: PLC0415 - optional benchmark dependency

        return hnswlib
    except ImportError:
        return None


def skip_without(name: str):
    pytest.skip(f"{name} is not installed (optional benchmark baseline: pip install affectkit[bench-knn])")


def build_faiss(faiss, x, M=32, ef_construction=100, tag=""):
    """(IndexFlatIP, IndexHNSWFlat) over x; prints the graph's build time."""
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    hnsw = faiss.IndexHNSWFlat(x.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    t = time.perf_counter()
    hnsw.add(x)
    print(f"[{tag}] faiss HNSW M={M} efC={ef_construction} build {time.perf_counter() - t:.1f} s")
    return flat, hnsw


def build_hnswlib(hnswlib, x, M=16, ef_construction=100, tag=""):
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), ef_construction=ef_construction, M=M, random_seed=0)
    t = time.perf_counter()
    index.add_items(x, np.arange(len(x)))
    print(f"[{tag}] hnswlib M={M} efC={ef_construction} build {time.perf_counter() - t:.1f} s")
    return index


def faiss_selector_params(faiss, mask, **kw):
    """SearchParameters restricted to `mask`; returns (params, bits): keep `bits` alive while
    the parameters are used (the selector holds a raw pointer into it)."""
    bits = np.packbits(mask, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
    cls = (faiss.SearchParametersHNSW if "efSearch" in kw
           else faiss.SearchParametersIVF if "nprobe" in kw else faiss.SearchParameters)
    return cls(sel=sel, **kw), bits, sel


# IVF probes tried, cheapest first (as EF_SWEEP: steps of 1.25-2x).
NPROBE_SWEEP = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def ivf_lists(n):
    """List counts tried for FAISS IVF: 256 and 1,024 at 200,000 rows (FAISS suggests 4 to 16
    sqrt(n)); fewer for small smoke-test sets (FAISS wants 39 training rows a list)."""
    return tuple(sorted({max(1, min(lists, n // 39)) for lists in (256, 1024)}))


def build_faiss_ivf(faiss, x, tag=""):
    """IndexIVFFlat (inner product) over x for each of ivf_lists(len(x)); prints the times."""
    out = []
    for lists in ivf_lists(len(x)):
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        ivf.train(x)
        ivf.add(x)
        print(f"[{tag}] faiss IVF{lists},Flat train + add {time.perf_counter() - t:.1f} s")
        out.append(ivf)
    return out


def cheapest_faiss_ivf(faiss, ivfs, q, k, mask, want):
    """The fastest (index, nprobe) reaching TARGET_RECALL: for each index the smallest such
    nprobe, timed once; (ivf, nprobe, recall, params, keep-alive), or the best recall tried."""
    best, fallback = None, None
    for ivf in ivfs:
        for nprobe in (p for p in NPROBE_SWEEP if p <= ivf.nlist):
            params, bits, sel = faiss_selector_params(faiss, mask, nprobe=nprobe)
            t = time.perf_counter()
            got = ivf.search(q, k, params=params)[1]
            took = time.perf_counter() - t
            rec = recall(got, want)
            entry = (ivf, nprobe, rec, params, (bits, sel))
            if fallback is None or rec > fallback[2]:
                fallback = entry
            if rec >= TARGET_RECALL:
                if best is None or took < best[0]:
                    best = (took, entry)
                break
    return best[1] if best is not None else fallback


def hnswlib_search(index, q, k, mask):
    """hnswlib's filtered search: the filter is a Python callable run for every visited node.
    Fewer than k passing rows is an error in hnswlib; ask for at most that many."""
    allowed = mask.tolist()
    kk = min(k, int(mask.sum()))
    keep = lambda i: allowed[i]  # noqa: E731
    try:
        labels, _ = index.knn_query(q, k=kk, filter=keep)
        return labels.astype(np.int64)
    except RuntimeError:  # some query found fewer than kk passing rows: redo one by one
        out = np.full((len(q), kk), -1, dtype=np.int64)
        for i in range(len(q)):
            try:
                out[i] = index.knn_query(q[i : i + 1], k=kk, filter=keep)[0][0]
            except RuntimeError:
                pass  # counted as misses
        return out


def sweep_ef(search_at, want, sweep_rows=None):
    """The cheapest ef in EF_SWEEP whose recall reaches TARGET_RECALL (or the best tried):
    (ef, recall). `search_at(ef)` returns ids for all queries (or `sweep_rows` of them)."""
    best = None
    for ef in EF_SWEEP:
        got = search_at(ef)
        rec = recall(got, want if sweep_rows is None else want[sweep_rows])
        if best is None or rec > best[1]:
            best = (ef, rec)
        if rec >= TARGET_RECALL:
            return ef, rec
    return best


def torch_inputs(x, q, mask):
    return torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(mask)
