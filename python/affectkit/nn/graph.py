"""Graph layers for EEG electrodes, shaped like PyTorch Geometric's dense layers.

Node features are (..., N, F) (batch and time dimensions first, like torcheeg's
(batch, electrodes, features) with extra leading dimensions allowed); graphs are dense
(N, N) matrices, or (B, N, N) with one graph per leading index.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..eeg.adjacency import gcn_normalize, rescaled_laplacian
from ..eeg.hierarchy import Level, build_hierarchy
from ..eeg.presets import PRESETS


class GraphConv(nn.Module):
    """``act(A x W + b)`` in one fused kernel (a dense ``GCNConv``).

    Args:
        in_channels, out_channels: feature sizes F and F_out.
        bias: learn an additive bias.
        activation: None, "relu", "elu", "leaky_relu", "tanh" or "sigmoid" (fused).
        normalize: apply ``D^-1/2 (A + I) D^-1/2`` to the adjacency given to ``forward``
            (as GCNConv does); leave it off when passing an already normalised matrix.

    Example:
        >>> from affectkit.eeg import gcn_normalize, knn_adjacency, standard_montage, DREAMER_CHANNELS
        >>> A = gcn_normalize(knn_adjacency(standard_montage(DREAMER_CHANNELS), k=3))
        >>> conv = GraphConv(5, 32, activation="relu")
        >>> conv(torch.randn(8, 128, 14, 5), A).shape  # (batch, windows, electrodes, features)
        torch.Size([8, 128, 14, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True,
                 activation: Optional[str] = None, normalize: bool = False):
        super().__init__()
        ops.graph._activation_code(activation)  # fail early on a bad name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation, self.normalize = activation, normalize
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)  # glorot, as PyG
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            adjacency = gcn_normalize(adjacency)
        return ops.graph_conv(x, adjacency, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, normalize={self.normalize}")


class ChebGraphConv(nn.Module):
    """Chebyshev spectral filter ``sum_{k<K} T_k(L) x Theta_k (+ b)`` (``ChebConv``).

    Args:
        in_channels: feature size F.
        out_channels: F_out with (K, F, F_out) weight matrices, or None for K scalar
            coefficients and F_out = F (HiSTN: K = 3 terms, i.e. polynomial order 2).
        K: number of Chebyshev terms T_0 .. T_{K-1} (PyG's filter size; order K - 1).
        bias: learn an additive bias (matrix mode only).

    ``forward(x, laplacian)`` takes the rescaled Laplacian ``2 L / lambda_max - I``
    (``affectkit.eeg.rescaled_laplacian`` or ``ElectrodeHierarchy.laplacian``).

    Example:
        >>> from affectkit.eeg import rescaled_laplacian, ring_adjacency
        >>> cheb = ChebGraphConv(16, None, K=3)          # three scalar coefficients
        >>> cheb(torch.randn(32, 4, 16), rescaled_laplacian(ring_adjacency(4))).shape
        torch.Size([32, 4, 16])
    """

    def __init__(self, in_channels: int, out_channels: Optional[int], K: int, bias: bool = True):
        super().__init__()
        if K < 1:
            raise ValueError(f"K: expected at least one Chebyshev term, got {K}")
        self.in_channels, self.out_channels, self.K = in_channels, out_channels, K
        if out_channels is None:
            self.weight = nn.Parameter(torch.empty(K))
            self.bias = None
        else:
            self.weight = nn.Parameter(torch.empty(K, in_channels, out_channels))
            self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.out_channels is None:
            nn.init.constant_(self.weight, 1.0 / self.K)
        else:
            for k in range(self.K):
                nn.init.xavier_uniform_(self.weight[k])
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        out = ops.cheb_graph_conv(x, laplacian, self.weight)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, K={self.K}, bias={self.bias is not None}"


class HierarchicalPool(nn.Module):
    """Pool child nodes into parents by a fixed assignment: mean or learned softmax attention.

    Args:
        assignment: (N,) parent index of every child node, in [0, P).
        num_parents: P (default ``max(assignment) + 1``).
        in_channels: with attention, the feature size F; each child is scored by ``x . a``
            and every parent takes the softmax-weighted sum of its children (HiSTN).

    ``forward(x, scores=None)``: x (..., N, F) -> (..., P, F); explicit ``scores`` (..., N)
    replace the learned ones.

    Example:
        >>> from affectkit.eeg import build_hierarchy, PRESETS
        >>> levels = build_hierarchy(**PRESETS["dreamer"])
        >>> pool = HierarchicalPool(levels[0].assignment, in_channels=5)
        >>> pool(torch.randn(8, 14, 5)).shape
        torch.Size([8, 4, 5])
    """

    def __init__(self, assignment: Sequence[int] | torch.Tensor, num_parents: Optional[int] = None,
                 in_channels: Optional[int] = None):
        super().__init__()
        a = torch.as_tensor(assignment, dtype=torch.int64)
        if a.dim() != 1:
            raise ValueError(f"assignment: expected a 1-D sequence of parent indices, got shape {tuple(a.shape)}")
        self.register_buffer("assignment", a)
        self.num_parents = int(a.max()) + 1 if num_parents is None else int(num_parents)
        self.attention = nn.Parameter(torch.empty(in_channels)) if in_channels else None
        if self.attention is not None:
            nn.init.normal_(self.attention, std=1.0 / math.sqrt(in_channels))

    def forward(self, x: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        if scores is None and self.attention is not None:
            scores = x @ self.attention
        return ops.hierarchical_pool(x, self.assignment, scores, self.num_parents)

    def extra_repr(self) -> str:
        return f"num_children={self.assignment.numel()}, num_parents={self.num_parents}, attention={self.attention is not None}"


class ElectrodeHierarchy(nn.Module):
    """A montage, its levels (electrodes -> regions -> ... -> global) and a graph per level.

    Build it from a preset ("dreamer": HiSTN's 14 Emotiv channels in four regions on a ring;
    "deap": 32 channels; "seed": 62 channels; DEAP/SEED regions by lobe and hemisphere) or
    from channel names and nested groups. Everything lives in buffers, so ``.to(device)``
    moves it with the model.

    Example:
        >>> h = ElectrodeHierarchy.from_preset("dreamer")
        >>> h.level_sizes
        [14, 4, 1]
        >>> h.laplacian(1).shape, h.assignment(0).tolist()[:5]
        (torch.Size([4, 4]), [0, 0, 0, 0, 1])
    """

    def __init__(self, channels: Sequence[str], groups, **options):
        super().__init__()
        levels: list[Level] = build_hierarchy(channels, groups, **options)
        self.channels = tuple(channels)
        self.names = [lvl.names for lvl in levels]
        self.positions = [lvl.positions for lvl in levels]
        for i, lvl in enumerate(levels):
            self.register_buffer(f"adjacency_{i}", lvl.adjacency)
            if lvl.assignment is not None:
                self.register_buffer(f"assignment_{i}", lvl.assignment)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ElectrodeHierarchy":
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[key], **overrides})

    @property
    def num_levels(self) -> int:
        return len(self.names)

    @property
    def level_sizes(self) -> list[int]:
        return [len(n) for n in self.names]

    def _check_level(self, level: int, need_parent: bool = False) -> int:
        top = self.num_levels - (2 if need_parent else 1)
        if not isinstance(level, int) or not 0 <= level <= top:
            raise ValueError(f"level: expected an int in [0, {top}], got {level!r}")
        return level

    def adjacency(self, level: int) -> torch.Tensor:
        """The raw (n, n) adjacency of a level (no self-loops)."""
        return getattr(self, f"adjacency_{self._check_level(level)}")

    def gcn_adjacency(self, level: int) -> torch.Tensor:
        """``D^-1/2 (A + I) D^-1/2`` for ``GraphConv``."""
        return gcn_normalize(self.adjacency(level))

    def laplacian(self, level: int, normalized: bool = False, lambda_max: Optional[float] = None) -> torch.Tensor:
        """Rescaled Laplacian ``2 L / lambda_max - I`` for ``ChebGraphConv`` (combinatorial L, as HiSTN)."""
        return rescaled_laplacian(self.adjacency(level), lambda_max, normalized)

    def assignment(self, level: int) -> torch.Tensor:
        """(n,) parent index, in level + 1, of every node of ``level``."""
        return getattr(self, f"assignment_{self._check_level(level, need_parent=True)}")

    def extra_repr(self) -> str:
        return f"channels={len(self.channels)}, level_sizes={self.level_sizes}"
