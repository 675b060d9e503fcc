"""Finite-value checks of graph operands on CUDA, once per tensor version.

The CPU core rejects a NaN or infinite adjacency or Laplacian as it reads it, at no cost. On
CUDA the same check needs a read-back, which makes the host wait for the GPU. Graphs are
mostly fixed (a montage's normalised adjacency) or change once per optimiser step (a learned
one), so a tensor is checked once and remembered by its storage, its place in that storage
and its version counter, which every in-place write bumps (optimiser steps included). A new
tensor, or one written since, is checked again.

Writes through ``.data`` or from outside PyTorch (DLPack, raw pointers) do not bump the
version counter and are not seen. Tensors made under ``torch.inference_mode`` have no version
counter and are checked on every call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._bridge import checks_values


def _graphs(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() == 3 else 1


def non_finite_graph_index(t: torch.Tensor) -> torch.Tensor:
    """On t's device, without waiting: the index of the first graph (leading index of a
    (B, N, N) batch; 0 for one (N, N) matrix) holding NaN or infinity, or the number of graphs
    if none does. A 0-d int64 tensor."""
    graphs = t.reshape(_graphs(t), t.shape[-2] * t.shape[-1])
    if graphs.numel() == 0:
        return torch.full((), graphs.shape[0], dtype=torch.int64, device=t.device)  # no host copy
    bad = ~torch.isfinite(graphs).all(dim=1)
    index = torch.arange(bad.shape[0], device=t.device)
    return torch.where(bad, index, bad.shape[0]).min()


def first_non_finite_graph(t: torch.Tensor) -> int:
    """non_finite_graph_index read back (one wait), -1 if every graph is finite."""
    first = int(non_finite_graph_index(t))
    return -1 if first == _graphs(t) else first


class FiniteChecks:
    """Which tensors were found finite: storage -> {(offset, shape, strides, dtype): version}.
    Entries go when their storage is freed, so a new tensor at a reused address is checked."""

    def __init__(self) -> None:
        self._seen = WeakIdKeyDictionary()

    @staticmethod
    def _place(t: torch.Tensor) -> tuple:
        return (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def known_finite(self, t: torch.Tensor) -> bool:
        if t.is_inference():
            return False
        versions = self._seen.get(t.untyped_storage())
        return versions is not None and versions.get(self._place(t)) == t._version

    def check(self, name: str, t: torch.Tensor) -> None:
        """Raise ValueError naming `name` if t holds NaN or infinity; remember it otherwise."""
        if not self.known_finite(t):
            self.record(name, t, first_non_finite_graph(t))

    def record(self, name: str, t: torch.Tensor, first_bad: int) -> None:
        """Raise for a non-finite graph (first_bad >= 0), else remember t as finite."""
        if first_bad >= 0:
            where = f" in {name}[{first_bad}]" if t.dim() == 3 and t.shape[0] > 1 else ""
            raise ValueError(f"{name}: expected finite values, got NaN or infinity{where}")
        if not t.is_inference():
            self._seen.setdefault(t.untyped_storage(), {})[self._place(t)] = t._version


_CHECKS = FiniteChecks()


def check_finite_graph(name: str, t: torch.Tensor) -> None:
    """The CUDA side of the core's finite check (the CPU core checks its own operands);
    skipped while a CUDA graph is being captured, where nothing may wait for the GPU."""
    if t.is_cuda and checks_values(t):
        _CHECKS.check(name, t)


def pending_finite_check(t: torch.Tensor) -> Optional[torch.Tensor]:
    """For an op that reads back other values too (one wait per call): None if t needs no
    check, else the device tensor to read back with them and pass to finish_finite_check."""
    if t.is_cuda and checks_values(t) and not _CHECKS.known_finite(t):
        return non_finite_graph_index(t)
    return None


def finish_finite_check(name: str, t: torch.Tensor, index: int) -> None:
    """The second half of pending_finite_check, given its tensor's value."""
    _CHECKS.record(name, t, -1 if index == _graphs(t) else index)
