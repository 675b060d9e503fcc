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
}
CHECKS["filtered_knn"] = _check_filtered_knn


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
