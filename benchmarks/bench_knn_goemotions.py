"""Filtered k-NN on real embeddings: GoEmotions texts encoded with all-MiniLM-L6-v2, filtered by emotion.

Data: the GoEmotions training texts ($AFFECTKIT_DATA, else ../shared/data: goemotions/train.tsv,
43,410 texts) as 384-d unit vectors from all-MiniLM-L6-v2, each row carrying its set of
emotion labels (a multi-label set attribute); queries are GoEmotions dev texts. The vectors
come from affectkit's embedding cache (TextEncoder's cache, ~/.cache/affectkit): this
benchmark never encodes, and skips with a reason when the data or a cached vector is missing
(`affectkit index build --corpus goemotions` and any dev-set run fill the cache). Full run
(AFFECTKIT_KNN_FULL=1): every training text, 1,000 dev queries; else 5,000 texts and 50
queries so the suite's smoke run stays quick. k = 10, cosine.

Each group is one filter `any_of("emotions", [label])`, labels picked by selectivity:
neutral (32.8 % of the training texts), admiration (9.5 %), anger (3.6 %), grief (0.18 %).
Impls (recall@10 against the exact answer in extra_info["recall"], printed):
    affectkit          EmbeddingIndex.search in auto mode (the planner picks)
    affectkit-exact / -approx / -partition   the same search forced onto one path (the float32
                       index has its k-means partitions built)
    affectkit-fp16     auto mode on EmbeddingIndex(dtype=float16) (half the bytes per row)
    numpy              gather the passing rows, one matrix product, argpartition (exact)
    torch              the stock PyTorch path: full matrix product, masked_fill, topk (exact)
    faiss-flat         IndexFlatIP + IDSelectorBitmap (exact)              } when faiss-cpu
    faiss-hnsw         IndexHNSWFlat(M=32) + IDSelectorBitmap, cheapest efSearch reaching 0.95 }
    faiss-ivf          IndexIVFFlat (256 or 1,024 lists) + IDSelectorBitmap, fastest reaching 0.95 }
    hnswlib            hnswlib M=16 with its filter callable, cheapest ef reaching 0.95 (when installed)
Per-query masks (bench_op_per_query_masks): a different random mask per query at 0.5 %, 3 % and
10 % of the rows, affectkit.ops.filtered_knn against torch's masked matrix product + topk.

Floor (full run): an exact scan of label share s reads s * 43,410 * 384 * 4 B = s * 67 MB of
rows per block of queries and does 2 * s * 43,410 * 384 = s * 33 MFLOP per query: for 1,000
queries 11 GFLOP at neutral (about 0.2 s at 56 GFLOP/s on 2 cores), 60 MFLOP at grief.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _knn_baselines import (
    build_faiss,
    build_faiss_ivf,
    build_hnswlib,
    cheapest_faiss_ivf,
    faiss_or_none,
    faiss_selector_params,
    hnswlib_or_none,
    hnswlib_search,
    numpy_gather,
    recall,
    skip_without,
    sweep_ef,
    torch_inputs,
    torch_masked,
)
from affectkit.index import EmbeddingIndex, any_of

FULL = os.environ.get("AFFECTKIT_KNN_FULL") == "1"
N_TRAIN = None if FULL else 5_000  # None: every training text
NQ = int(os.environ.get("AFFECTKIT_KNN_NQ", 1_000 if FULL else 50))
K = 10
SELECTIVITY_LABEL = {"32.8%": "neutral", "9.5%": "admiration", "3.6%": "anger", "0.18%": "grief"}
DATA = Path(os.environ.get("AFFECTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TAG = "knn_goemotions"


def _cached_vectors(encoder, texts, what):
    from affectkit.text.cache import text_key
    from affectkit.text.encoder import clean_texts

    found = encoder.cache.get_many([text_key(t) for t in clean_texts(texts)])
    missing = sum(v is None for v in found)
    if missing:
        pytest.skip(f"{missing} of {len(texts)} GoEmotions {what} texts have no cached {encoder.name} embedding "
                    f"under {encoder.cache.dir} (this benchmark never encodes; fill the cache first, e.g. "
                    "`affectkit index build --corpus goemotions`)")
    return np.stack(found).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    from affectkit.data import goemotions
    from affectkit.text.encoder import TextEncoder

    if not (DATA / "goemotions" / "train.tsv").is_file() or not (DATA / "goemotions" / "dev.tsv").is_file():
        pytest.skip(f"GoEmotions train/dev splits not found under {DATA} (set AFFECTKIT_DATA)")
    train = goemotions.load(DATA, "train")
    dev = goemotions.load(DATA, "dev")
    if N_TRAIN is not None:
        train = train.iloc[:N_TRAIN]
    encoder = TextEncoder()
    t = time.perf_counter()
    x = _cached_vectors(encoder, list(train["text"]), "training")
    q = _cached_vectors(encoder, list(dev["text"].iloc[:NQ]), "dev")
    emotions = [{goemotions.LABELS[i] for i in ids} for ids in train["labels"]]
    print(f"\n[{TAG}] {len(x)} training vectors, {len(q)} dev queries from the cache in "
          f"{time.perf_counter() - t:.1f} s")
    masks = {sel: np.array([lab in e for e in emotions]) for sel, lab in SELECTIVITY_LABEL.items()}
    for sel, m in masks.items():
        print(f"[{TAG}] {SELECTIVITY_LABEL[sel]}: {int(m.sum())} rows ({m.mean():.2%})")

    indexes = {}
    for dtype in ("float32", "float16"):
        index = EmbeddingIndex(x.shape[1], "cosine", dtype=dtype)
        index.add(x, {"emotions": emotions})
        t = time.perf_counter()
        index.build_graph()
        print(f"[{TAG}] affectkit {dtype} graph build (M={index.graph_params['M']}, efC=100) "
              f"{time.perf_counter() - t:.1f} s")
        indexes[dtype] = index
    t = time.perf_counter()
    indexes["float32"].build_partitions()
    print(f"[{TAG}] affectkit partitions ({indexes['float32'].partition_count}) build {time.perf_counter() - t:.1f} s")
    exact = {sel: indexes["float32"].search(q, K, where=_where(sel), mode="exact")[1] for sel in SELECTIVITY_LABEL}

    faiss = faiss_or_none()
    faiss_state = (faiss, *build_faiss(faiss, x, tag=TAG), build_faiss_ivf(faiss, x, tag=TAG)) if faiss else None
    hnswlib = hnswlib_or_none()
    hnswlib_index = build_hnswlib(hnswlib, x, tag=TAG) if hnswlib is not None else None
    return x, q, masks, indexes, exact, faiss_state, hnswlib_index


def _where(sel):
    return any_of("emotions", [SELECTIVITY_LABEL[sel]])


def _group(sel):
    return f"knn_goemotions {SELECTIVITY_LABEL[sel]} ({sel}) N={N_TRAIN or 43410}"


def _report(benchmark, name, sel, rec):
    benchmark.extra_info["recall"] = rec
    print(f"[{TAG}] {SELECTIVITY_LABEL[sel]:<10} ({sel:>5}) {name:<22} recall@10 {rec:.3f}")


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_affectkit_auto(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, *_ = data
    plan = indexes["float32"].explain(_where(sel))
    _, ids = bench(_group(sel), "affectkit", indexes["float32"].search, q, K, _where(sel))
    _report(benchmark, f"affectkit({plan['mode']})", sel, recall(ids, exact[sel]))


@pytest.mark.parametrize("mode", ["exact", "approx", "partition"])
@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_affectkit_forced(bench, benchmark, data, sel, mode):
    x, q, masks, indexes, exact, *_ = data
    _, ids = bench(_group(sel), f"affectkit-{mode}", indexes["float32"].search, q, K, _where(sel), mode)
    _report(benchmark, f"affectkit-{mode}", sel, recall(ids, exact[sel]))


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_affectkit_float16(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, *_ = data
    plan = indexes["float16"].explain(_where(sel))
    _, ids = bench(_group(sel), "affectkit-fp16", indexes["float16"].search, q, K, _where(sel))
    _report(benchmark, f"affectkit-fp16({plan['mode']})", sel, recall(ids, exact[sel]))


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_numpy_gather(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, *_ = data
    ids = bench(_group(sel), "numpy", numpy_gather, x, q, masks[sel], K)
    _report(benchmark, "numpy", sel, recall(ids, exact[sel]))


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_torch_masked(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, *_ = data
    ids = bench(_group(sel), "torch", torch_masked, *torch_inputs(x, q, masks[sel]), K)
    ids = np.where(np.isin(ids.numpy(), np.flatnonzero(masks[sel])), ids.numpy(), -1)  # topk pads with masked rows
    _report(benchmark, "torch", sel, recall(ids, exact[sel]))


PER_QUERY_DENSITY = ["0.5%", "3%", "10%"]


@pytest.fixture(scope="module")
def per_query_masks(data):
    """A different random allow-mask per query (torch bool (nq, n)) at each density."""
    x, q, *_ = data
    g = torch.Generator().manual_seed(0)
    return {dens: torch.rand(len(q), len(x), generator=g) < float(dens[:-1]) / 100 for dens in PER_QUERY_DENSITY}


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("dens", PER_QUERY_DENSITY)
def bench_op_per_query_masks(bench, benchmark, data, per_query_masks, dens, impl):
    """affectkit.ops.filtered_knn with a (nq, n) mask, against the stock masked matrix product
    + topk. Below a few percent the op scores each query's own candidate rows; above, it
    passes over every row, masking as it folds (the switch depends on the rows' bytes)."""
    import affectkit.ops as ops

    x, q, *_ = data
    xt, qt = torch.from_numpy(x), torch.nn.functional.normalize(torch.from_numpy(q), dim=1)
    mask = per_query_masks[dens]
    group = f"knn_goemotions per-query masks {dens} N={N_TRAIN or 43410}"
    if impl == "affectkit":
        _, ids = bench(group, "affectkit", ops.filtered_knn, qt, xt, mask, K, "ip")
    else:
        ids = bench(group, "torch", lambda: (qt @ xt.T).masked_fill_(~mask, float("-inf")).topk(K, dim=1).indices)
    want = ops.filtered_knn(qt.double(), xt.double(), mask, K, "ip")[1]
    ids = torch.where(torch.gather(mask, 1, ids.clamp(min=0)) & (ids >= 0), ids, -1)  # topk pads with masked rows
    benchmark.extra_info["recall"] = rec = recall(ids.numpy(), want.numpy())
    print(f"[{TAG}] per-query masks {dens:>4} {impl:<10} recall@10 {rec:.3f}")


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_faiss_flat(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, fs, _ = data
    if fs is None:
        skip_without("faiss-cpu")
    faiss, flat, *_ = fs
    params, bits, _sel = faiss_selector_params(faiss, masks[sel])
    _, ids = bench(_group(sel), "faiss-flat", lambda: flat.search(q, K, params=params))
    _report(benchmark, "faiss-flat", sel, recall(ids, exact[sel]))


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_faiss_hnsw(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, fs, _ = data
    if fs is None:
        skip_without("faiss-cpu")
    faiss, _, hnsw, _ = fs
    keep = []

    def at(ef):
        params, bits, s = faiss_selector_params(faiss, masks[sel], efSearch=ef)
        keep.append((params, bits, s))
        return hnsw.search(q, K, params=params)[1]

    ef, rec = sweep_ef(at, exact[sel])
    params, bits, _s = faiss_selector_params(faiss, masks[sel], efSearch=ef)
    bench(_group(sel), "faiss-hnsw", lambda: hnsw.search(q, K, params=params))
    benchmark.extra_info["ef"] = ef
    _report(benchmark, f"faiss-hnsw(ef={ef})", sel, rec)


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_faiss_ivf(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, fs, _ = data
    if fs is None:
        skip_without("faiss-cpu")
    faiss, _, _, ivfs = fs
    ivf, nprobe, rec, params, _keep = cheapest_faiss_ivf(faiss, ivfs, q, K, masks[sel], exact[sel])
    bench(_group(sel), "faiss-ivf", lambda: ivf.search(q, K, params=params))
    benchmark.extra_info["nlist"], benchmark.extra_info["nprobe"] = ivf.nlist, nprobe
    _report(benchmark, f"faiss-ivf{ivf.nlist}(nprobe={nprobe})", sel, rec)


@pytest.mark.parametrize("sel", list(SELECTIVITY_LABEL))
def bench_hnswlib(bench, benchmark, data, sel):
    x, q, masks, indexes, exact, _, hl = data
    if hl is None:
        skip_without("hnswlib")
    sweep_rows = np.arange(min(len(q), 200))  # its filter is a Python callback: sweep on a subset

    def at(ef):
        hl.set_ef(ef)
        return hnswlib_search(hl, q[sweep_rows], K, masks[sel])

    ef, _ = sweep_ef(at, exact[sel], sweep_rows)
    hl.set_ef(ef)
    ids = bench(_group(sel), "hnswlib", hnswlib_search, hl, q, K, masks[sel])
    benchmark.extra_info["ef"] = ef
    _report(benchmark, f"hnswlib(ef={ef})", sel, recall(ids, exact[sel]))
