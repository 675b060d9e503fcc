"""filtered_knn: exact k-nearest-neighbour search restricted to allowed database rows.

The op has no autograd formula: ids are discrete and the distances are a selection, so
it is meant for retrieval inside a model (wrap the distances' inputs in
``torch.no_grad()``, or recompute distances of the returned ids with plain torch when a
gradient is needed).
"""

from __future__ import annotations

import torch

from .. import _C
from ._bridge import (
    affectkit_op,
    call_direct_or_op,
    check_float_dtype,
    check_same_device,
    check_tensor,
    device_code,
    dtype_code,
    ptr,
    stream_handle,
)

METRICS = {"ip": 0, "l2": 1, "cosine": 2}
CUDA_KNN_DTYPES = (torch.float32, torch.float16)
CUDA_MAX_K = 256  # the fused CUDA kernel keeps each query's list in shared memory


def filtered_knn(
    queries: torch.Tensor,
    database: torch.Tensor,
    allow_mask: torch.Tensor | None = None,
    k: int = 10,
    metric: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k allowed database rows nearest to each query, exactly.

    Args:
        queries: (nq, d) floating tensor (float32/float64 on CPU, float32/float16 on CUDA).
        database: (n, d) tensor on the same device, of the queries' dtype; on the CPU it may
            also be float16 with float32 queries: the rows are converted to float32 as they
            are scored (half the bytes read; with "cosine" they are normalised in float32 and
            rounded back to float16 first).
        allow_mask: None (every row allowed), or a bool/uint8 tensor on the same device,
            (n,) shared by all queries or (nq, n) one row per query; nonzero = allowed.
        k: number of neighbours (> 0; at most 256 on CUDA).
        metric: "l2" (squared Euclidean distance), "ip" (distance = -<q, x>) or
            "cosine" (distance = 1 - cosine similarity; zero vectors count as orthogonal).

    Returns:
        distances (nq, k) of the queries' dtype, ascending, and ids (nq, k) int64 (database
        row indices). Ties go to the smaller id. When fewer than k rows are allowed the rest
        is id -1 with distance +inf. Rows whose distance is NaN are never returned.
        No gradient flows through this op.
    """
    check_tensor("queries", queries, ndim=2)
    if queries.is_cuda:
        check_tensor("queries", queries, dtypes=CUDA_KNN_DTYPES)
    else:
        check_float_dtype("queries", queries)
    check_tensor("database", database, ndim=2)
    check_same_device("database", database, "queries", queries)
    mixed = not queries.is_cuda and queries.dtype == torch.float32 and database.dtype == torch.float16
    if database.dtype != queries.dtype and not mixed:
        raise TypeError(f"database: expected dtype {queries.dtype} (the dtype of queries), or torch.float16 with "
                        f"float32 queries on the CPU, got {database.dtype}")
    if database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"database: expected {queries.shape[1]} columns (queries.shape[1]), got shape {tuple(database.shape)}"
        )
    if allow_mask is not None:
        check_tensor("allow_mask", allow_mask, dtypes=(torch.bool, torch.uint8))
        check_same_device("allow_mask", allow_mask, "queries", queries)
        n, nq = database.shape[0], queries.shape[0]
        if tuple(allow_mask.shape) not in {(n,), (nq, n)}:
            raise ValueError(f"allow_mask: expected shape ({n},) or ({nq}, {n}), got {tuple(allow_mask.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if queries.is_cuda and k > CUDA_MAX_K:
        raise ValueError(f"k: expected at most {CUDA_MAX_K} on CUDA, got {k}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {sorted(METRICS)}, got {metric!r}")
    return call_direct_or_op(_filtered_knn.plain, torch.ops.affectkit.filtered_knn,
                             queries, database, allow_mask, k, metric)


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, zero rows left zero. 16-bit rows are normalised in float32:
    in float16 normalize's eps (1e-12) underflows to 0 and a zero row became 0/0 = NaN."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.nn.functional.normalize(t.float(), dim=1).to(t.dtype)
    return torch.nn.functional.normalize(t, dim=1)


@affectkit_op("affectkit::filtered_knn")
def _filtered_knn(
    queries: torch.Tensor, database: torch.Tensor, allow_mask: torch.Tensor | None, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if metric == "cosine":
        queries, database = _unit_rows(queries), _unit_rows(database)
    queries = queries.contiguous()
    database = database.contiguous()
    nq, d = queries.shape
    n = database.shape[0]
    dist = queries.new_empty((nq, k))
    ids = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
    mask_ptr, per_query = 0, False
    if allow_mask is not None:
        allow_mask = allow_mask.contiguous()
        if allow_mask.dtype == torch.bool:
            allow_mask = allow_mask.view(torch.uint8)
        per_query = allow_mask.dim() == 2
        mask_ptr = ptr(allow_mask)
        if allow_mask.numel() == 0:  # n == 0 (or nq == 0): nothing is allowed anyway
            mask_ptr, per_query = 0, False
    _C.exact_knn(
        device_code(queries), dtype_code(queries), ptr(queries), nq, ptr(database), n, d,
        METRICS[metric], k, mask=mask_ptr, mask_per_query=per_query,
        out_dist=ptr(dist), out_ids=ptr(ids), stream=stream_handle(queries), db_dtype=dtype_code(database),
    )
    return dist, ids


@_filtered_knn.register_fake
def _(queries, database, allow_mask, k, metric):
    nq = queries.shape[0]
    return queries.new_empty((nq, k)), queries.new_empty((nq, k), dtype=torch.int64)
