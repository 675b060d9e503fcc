"""A quick end-to-end check of every op against a float64 reference on fresh random inputs.

Run by `affectkit selfcheck`: it proves on the user's machine that the compiled kernels
load, run on each available device and agree with the plain PyTorch formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CheckResult:
    op: str
    device: str
    dtype: str
    rel_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error of got against a float64 reference."""
    got, want = got.double(), want.double()
    denom = torch.linalg.vector_norm(want).item()
    diff = torch.linalg.vector_norm(got - want).item()
    return diff / denom if denom > 0 else diff


def _check_masked_mean(device: str, dtype: torch.dtype, gen: torch.Generator) -> float:
    from .ops import masked_mean

    B, L, F = 7, 13, 37
    x = torch.randn(B, L, F, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None, :, None] < lengths[:, None, None]
    want = (x * mask).sum(1) / lengths.clamp(min=1)[:, None]
    got = masked_mean(x.to(device, dtype), lengths.to(device))
    return rel_error(got.cpu(), want)


def _check_cross_modal_attention(device: str, dtype: torch.dtype, gen: torch.Generator) -> float:
    from .ops import cross_modal_attention

    B, H, Lq, Lk, D = 3, 2, 11, 19, 16
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64)
    kv_lengths = torch.tensor([Lk, 1, 7])
    s = (q @ k.transpose(-1, -2)) / D**0.5
    s = s.masked_fill(torch.arange(Lk)[None, None, None, :] >= kv_lengths[:, None, None, None], float("-inf"))
    want = torch.softmax(s, -1) @ v
    got = cross_modal_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                                kv_lengths=kv_lengths.to(device))
    return rel_error(got.cpu(), want)


def _check_graph_conv(device: str, dtype: torch.dtype, gen: torch.Generator) -> float:
    from .ops import graph_conv_pool

    S, N, F, Fo = 9, 14, 5, 32
    x = torch.randn(S, N, F, generator=gen, dtype=torch.float64)
    A = torch.rand(N, N, generator=gen, dtype=torch.float64) / N
    W = torch.randn(F, Fo, generator=gen, dtype=torch.float64) / F**0.5
    b = torch.randn(Fo, generator=gen, dtype=torch.float64)
    assignment = torch.arange(N) % 4
    node = torch.relu(A @ x @ W + b)
    pool = torch.nn.functional.one_hot(assignment, 4).T.double()
    want = torch.cat([node.flatten(), ((pool / pool.sum(1, keepdim=True)) @ node).flatten()])
    args = [t.to(device, dtype) for t in (x, A, W, b)]
    got_node, got_pooled = graph_conv_pool(args[0], args[1], assignment.to(device), args[2], args[3], "relu", None, 4)
    return rel_error(torch.cat([got_node.flatten(), got_pooled.flatten()]).cpu(), want)


def _check_cheb_graph_conv(device: str, dtype: torch.dtype, gen: torch.Generator) -> float:
    from .ops import cheb_graph_conv

    x = torch.randn(7, 14, 5, generator=gen, dtype=torch.float64)
    L = torch.randn(14, 14, generator=gen, dtype=torch.float64) / 14
    theta = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    want = x @ theta[0] + (L @ x) @ theta[1] + (2 * L @ (L @ x) - x) @ theta[2]
    got = cheb_graph_conv(x.to(device, dtype), L.to(device, dtype), theta.to(device, dtype))
    return rel_error(got.cpu(), want)


def _check_filtered_knn(device: str, dtype: torch.dtype, gen: torch.Generator) -> float:
    """Relative error of the k distances against float64 brute force; inf when an id differs.

    Integer-valued vectors make every distance exact in each dtype, so ids must match
    (ties go to the smaller id). The CUDA kernel takes float32/float16: other dtypes run in
    float32 there.
    """
    from .ops import filtered_knn

    nq, n, d, k = 7, 101, 37, 9
    q = torch.randint(-3, 4, (nq, d), generator=gen).double()
    x = torch.randint(-3, 4, (n, d), generator=gen).double()
    mask = torch.rand(n, generator=gen) < 0.5
    dist = ((q[:, None] - x[None]) ** 2).sum(-1).masked_fill(~mask, float("inf"))
    order = torch.sort(dist, dim=1, stable=True)  # stable: smaller id first on ties
    want_d, want_i = order.values[:, :k], order.indices[:, :k]
    run_dtype = dtype if device == "cpu" or dtype in (torch.float32, torch.float16) else torch.float32
    got_d, got_i = filtered_knn(q.to(device, run_dtype), x.to(device, run_dtype), mask.to(device), k, "l2")
    if not torch.equal(got_i.cpu(), want_i):
        return float("inf")
    return rel_error(got_d.cpu(), want_d)


CHECKS: dict[str, Callable[[str, torch.dtype, torch.Generator], float]] = {
    "masked_mean": _check_masked_mean,
    "cross_modal_attention": _check_cross_modal_attention,
    "graph_conv_pool": _check_graph_conv,
    "cheb_graph_conv": _check_cheb_graph_conv,
    "filtered_knn": _check_filtered_knn,
}


def run(seed: int | None = None) -> list[CheckResult]:
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    devices = [("cpu", (torch.float32, torch.float64))]
    if torch.cuda.is_available():
        from . import _C

        if _C.build_info()["cuda_compiled"]:
            devices.append(("cuda", (torch.float32, torch.float16, torch.bfloat16)))
    results = []
    for name, check in CHECKS.items():
        for device, dtypes in devices:
            for dtype in dtypes:
                err = check(device, dtype, gen)
                results.append(CheckResult(name, device, str(dtype).removeprefix("torch."), err, _TOLERANCE[dtype]))
    return results
