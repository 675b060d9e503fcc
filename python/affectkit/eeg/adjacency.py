"""Adjacency matrices for electrode graphs and their normalisations.

Builders return dense symmetric (N, N) tensors without self-loops; ``gcn_normalize`` and
``rescaled_laplacian`` prepare them for ``graph_conv`` and ``cheb_graph_conv``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn


def _positions(positions) -> np.ndarray:
    p = np.asarray(getattr(positions, "positions", positions), dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"positions: expected an (N, 3) array or a Montage, got shape {p.shape}")
    return p


def _distances(p: np.ndarray) -> np.ndarray:
    d = p[:, None, :] - p[None, :, :]
    return np.sqrt((d * d).sum(-1))


def knn_adjacency(positions, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Connect every electrode to its k nearest neighbours (symmetrised: i~j if either picks the other).

    Example:
        >>> from affectkit.eeg import standard_montage, DREAMER_CHANNELS
        >>> A = knn_adjacency(standard_montage(DREAMER_CHANNELS), k=3)
        >>> bool((A == A.T).all()), A.shape
        (True, torch.Size([14, 14]))
    """
    p = _positions(positions)
    N = p.shape[0]
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    k = min(k, max(N - 1, 0))
    A = np.zeros((N, N))
    if N > 1 and k > 0:
        d = _distances(p)
        np.fill_diagonal(d, np.inf)
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        A[np.repeat(np.arange(N), k), nearest.ravel()] = 1.0
        A = np.maximum(A, A.T)
    return torch.as_tensor(A, dtype=dtype)


def distance_adjacency(positions, threshold: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Connect electrodes closer than ``threshold`` metres (no self-loops)."""
    p = _positions(positions)
    if not threshold > 0:
        raise ValueError(f"threshold: expected a distance > 0 (metres), got {threshold!r}")
    A = (_distances(p) < threshold).astype(np.float64)
    np.fill_diagonal(A, 0.0)
    return torch.as_tensor(A, dtype=dtype)


def edge_adjacency(
    num_nodes: int, edges: Iterable[Sequence[int]], weights: Optional[Sequence[float]] = None,
    symmetric: bool = True, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Adjacency from explicit (i, j) edges, optionally weighted; symmetric by default."""
    A = torch.zeros(num_nodes, num_nodes, dtype=dtype)
    edges = [tuple(e) for e in edges]
    weights = [1.0] * len(edges) if weights is None else list(weights)
    if len(weights) != len(edges):
        raise ValueError(f"weights: expected one weight per edge ({len(edges)}), got {len(weights)}")
    for (i, j), w in zip(edges, weights):
        if not (0 <= i < num_nodes and 0 <= j < num_nodes):
            raise ValueError(f"edges: expected node indices in [0, {num_nodes - 1}], got ({i}, {j})")
        A[i, j] = w
        if symmetric:
            A[j, i] = w
    return A


def ring_adjacency(num_nodes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each node linked to the next and the last to the first (HiSTN's ring of regions)."""
    if num_nodes <= 1:
        return torch.zeros(num_nodes, num_nodes, dtype=dtype)
    edges = [(i, (i + 1) % num_nodes) for i in range(num_nodes)]
    return edge_adjacency(num_nodes, edges, dtype=dtype)


def group_adjacency(assignment: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Complete graph inside every group, nothing between groups (block diagonal, no self-loops)."""
    a = torch.as_tensor(list(assignment))
    A = (a[:, None] == a[None, :]).to(dtype)
    A.fill_diagonal_(0)
    return A


def gcn_normalize(adjacency: torch.Tensor, add_self_loops: bool = True) -> torch.Tensor:
    """Symmetric GCN normalisation ``D^-1/2 (A + I) D^-1/2`` (Kipf & Welling), batched over (..., N, N).

    Nodes without any edge (and no self-loop) get zero rows instead of dividing by zero.
    Differentiable, so it also normalises a learned adjacency.
    """
    A = adjacency
    if add_self_loops:
        A = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    deg = A.sum(-1)
    inv = torch.where(deg > 0, deg.clamp(min=torch.finfo(A.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    return inv.unsqueeze(-1) * A * inv.unsqueeze(-2)


def laplacian(adjacency: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Combinatorial ``D - A`` (HiSTN) or normalised ``I - D^-1/2 A D^-1/2`` graph Laplacian."""
    eye = torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
    if normalized:
        return eye - gcn_normalize(adjacency, add_self_loops=False)
    return torch.diag_embed(adjacency.sum(-1)) - adjacency


def rescaled_laplacian(
    adjacency: torch.Tensor, lambda_max: Optional[float] = None, normalized: bool = False
) -> torch.Tensor:
    """``2 L / lambda_max - I``: the Laplacian with its spectrum mapped into [-1, 1] for Chebyshev filters.

    ``lambda_max`` defaults to L's largest eigenvalue (2 for a graph without edges, where L = 0).

    Example:
        >>> L = rescaled_laplacian(ring_adjacency(4))  # HiSTN's region ring, K = 2 filters on it
        >>> [round(v, 6) for v in torch.linalg.eigvalsh(L).tolist()]
        [-1.0, 0.0, 0.0, 1.0]
    """
    L = laplacian(adjacency, normalized)
    if lambda_max is None:
        sym = (L + L.transpose(-1, -2)) / 2
        lam = float(torch.linalg.eigvalsh(sym.detach().double()).max()) if L.numel() else 0.0
        lambda_max = lam if lam > 1e-12 else 2.0
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return 2.0 * L / lambda_max - eye


class LearnedAdjacency(nn.Module):
    """A trainable symmetric non-negative adjacency (DGCNN, Song et al. 2018).

    ``forward()`` returns ``relu((W + W^T) / 2)``, GCN-normalised when ``normalize`` is set.

    Example:
        >>> from affectkit.eeg import standard_montage, SEED_CHANNELS
        >>> adj = LearnedAdjacency(knn_adjacency(standard_montage(SEED_CHANNELS), k=4))
        >>> adj().shape
        torch.Size([62, 62])
    """

    def __init__(self, init: torch.Tensor | int, normalize: bool = True):
        super().__init__()
        if isinstance(init, int):
            init = torch.rand(init, init)
        if init.dim() != 2 or init.shape[0] != init.shape[1]:
            raise ValueError(f"init: expected a square (N, N) matrix or N, got shape {tuple(init.shape)}")
        self.weight = nn.Parameter(init.detach().clone().float())
        self.normalize = normalize

    def forward(self) -> torch.Tensor:
        A = torch.relu((self.weight + self.weight.T) / 2)
        return gcn_normalize(A) if self.normalize else A

    def extra_repr(self) -> str:
        return f"num_nodes={self.weight.shape[0]}, normalize={self.normalize}"
