"""HiSTN (Kuang, Song & Michoski, 2024): a hierarchical spatial-temporal EEG network with
about 1,200 parameters, rebuilt in PyTorch after the authors' TensorFlow ``HST_model``
(mergeMode "dense", Chebyshev filters, F1 = 8, ksize = 64).

Layers, for input (batch, 14 electrodes, 128 samples):

1. Temporal front end (EEGNet-like): F1 temporal kernels of 64 taps shared by all electrodes,
   mixed per electrode into one signal (depthwise over the F1 maps), BN + ELU, a depthwise
   5-tap convolution ("valid"), BN + ELU, average pooling by 2, dropout -> (B, 14, 62).
2. Node level: per region, a Chebyshev filter (K = 3 terms, three scalars) on its electrode
   graph, then a separable 5-tap temporal convolution; BN + ELU; added to the input (residual).
3. Region level: attention pooling of each region's electrodes (a softmax over the region's
   electrodes of a dense map of their time-means), once of the front end and once of the node
   output; a Chebyshev filter on the ring of regions of the first; their sum.
4. Global node: attention pooling of the four regions, again of both; their sum.
5. Concatenate all 14 + 4 + 1 nodes, average over time, dropout, dense -> 5 logits.

``backend="affectkit"`` runs the graph steps on ``affectkit.ops`` (``cheb_graph_conv``,
``hierarchical_pool``); ``backend="torch"`` runs the same maths with stock PyTorch ops. Both
take the same state dict.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..eeg.adjacency import edge_adjacency, rescaled_laplacian, ring_adjacency
from ..eeg.presets import DREAMER_CHANNELS, HISTN_REGIONS

# Electrode graphs inside HiSTN's four regions, as the official code draws them (by name).
HISTN_REGION_EDGES = {
    "left_frontal": [("AF3", "F3"), ("F7", "F3"), ("F7", "FC5"), ("F3", "FC5")],
    "left_posterior": [("T7", "P7"), ("P7", "O1")],
    "right_posterior": [("O2", "P8"), ("P8", "T8")],
    "right_frontal": [("AF4", "F4"), ("F8", "F4"), ("F8", "FC6"), ("F4", "FC6")],
}
BACKENDS = ("affectkit", "torch")


def gaussian_ordinal_targets(targets: torch.Tensor, num_classes: int = 5, sigma: float = 0.5) -> torch.Tensor:
    """HiSTN's label smoothing: class k gets weight exp(-(k - y)^2 / (2 sigma^2)), normalised."""
    if sigma <= 0:
        raise ValueError(f"sigma: expected a width > 0, got {sigma}")
    grid = torch.arange(num_classes, dtype=torch.float64, device=targets.device)
    w = torch.exp(-0.5 * (grid[None, :] - targets.to(torch.float64)[:, None]) ** 2 / sigma**2)
    return w / w.sum(1, keepdim=True)


def gaussian_ordinal_loss(logits: torch.Tensor, targets: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Cross-entropy of the logits against Gaussian-smoothed ordinal targets (class indices)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits, targets: expected (n, classes) and (n,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    soft = gaussian_ordinal_targets(targets, logits.shape[1], sigma).to(logits.dtype)
    return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()


def _max_norm_(weight: torch.Tensor, dim: int, limit: float = 1.0) -> None:
    """Keras ``max_norm(limit)``: rescale slices whose L2 norm over ``dim`` exceeds it."""
    norm = weight.norm(dim=dim, keepdim=True)
    weight.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm)))


class HiSTN(nn.Module):
    """HiSTN for (batch, channels, samples) EEG windows; defaults to DREAMER (14 x 128, 5 classes).

    Args:
        channels: channel names in the data's order (default DREAMER's 14).
        regions: region name -> member channels, in ring order (default HiSTN's four).
        region_edges: region name -> electrode edges inside it (default the official graphs;
            None for a complete graph inside every region).
        samples: window length (128 = 1 s at 128 Hz).
        num_classes: 5 ordinal classes for DREAMER's 1..5 scores.
        F1, kernel_size: temporal kernels of the front end; dropout: rate of both dropouts.
        backend: "affectkit" (graph kernels) or "torch" (stock PyTorch ops).

    Example:
        >>> model = HiSTN()
        >>> model(torch.randn(2, 14, 128)).shape
        torch.Size([2, 5])
    """

    def __init__(self, channels: Sequence[str] = DREAMER_CHANNELS, regions=None, region_edges="official",
                 samples: int = 128, num_classes: int = 5, F1: int = 8, kernel_size: int = 64,
                 dropout: float = 0.5, backend: str = "affectkit"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        regions = HISTN_REGIONS if regions is None else regions
        if region_edges == "official":
            region_edges = HISTN_REGION_EDGES if regions is HISTN_REGIONS else None
        channels = tuple(channels)
        C = len(channels)
        grouped = [c for members in regions.values() for c in members]
        if sorted(grouped) != sorted(channels) or len(set(grouped)) != len(grouped):
            raise ValueError(f"regions: expected every channel of {list(channels)} in exactly one region, "
                             f"got {regions}")
        if samples < 6:  # the 5-tap "valid" convolution and the pooling by 2 need 6
            raise ValueError(f"samples: expected a window of at least 6 samples, got {samples}")
        self.channels, self.region_names, self.backend = channels, tuple(regions), backend
        self.num_classes, self.samples = num_classes, samples
        R = len(regions)

        # 1. temporal front end
        self.temporal = nn.Parameter(torch.empty(F1, kernel_size))  # Conv2D(F1, (ksize, 1)), no bias
        self.mix = nn.Parameter(torch.empty(C, F1))  # DepthwiseConv2D((1, F1)) per electrode
        self.bn1 = nn.BatchNorm1d(C, eps=1e-3, momentum=0.01)  # Keras' defaults
        self.depthwise = nn.Conv1d(C, C, 5, groups=C, bias=False)
        self.bn2 = nn.BatchNorm1d(C, eps=1e-3, momentum=0.01)
        self.drop = nn.Dropout(dropout)

        # 2. node level, one graph per region
        index = {c: i for i, c in enumerate(channels)}
        assignment = torch.empty(C, dtype=torch.int64)
        self.node_coefficients = nn.Parameter(torch.empty(R, 3))
        self.node_depthwise = nn.ModuleList()
        self.node_pointwise = nn.ModuleList()
        for r, (name, members) in enumerate(regions.items()):
            idx = torch.tensor([index[c] for c in members])
            assignment[idx] = r
            n = len(members)
            if region_edges is None:
                A = torch.ones(n, n) - torch.eye(n)
            else:
                pos = {c: i for i, c in enumerate(members)}
                A = edge_adjacency(n, [(pos[a], pos[b]) for a, b in region_edges[name]])
            self.register_buffer(f"members_{r}", idx)
            self.register_buffer(f"laplacian_{r}", rescaled_laplacian(A))
            self.node_depthwise.append(nn.Conv1d(n, n, 5, padding=2, groups=n, bias=False))
            self.node_pointwise.append(nn.Conv1d(n, n, 1, bias=False))
        self.node_bn = nn.BatchNorm1d(C, eps=1e-3, momentum=0.01)
        # Channels regrouped region after region (the order the region graphs see them in).
        order = torch.cat([getattr(self, f"members_{r}") for r in range(R)])
        self.register_buffer("region_order", order)
        self.register_buffer("region_inverse", torch.argsort(order))
        self.register_buffer("assignment", assignment)
        self.register_buffer("global_assignment", torch.zeros(R, dtype=torch.int64))

        # 3. region level: attention of each region over its electrodes, the ring filter
        self.region_attention = nn.ModuleList(nn.Linear(len(m), len(m)) for m in regions.values())
        self.region_attention_latter = nn.ModuleList(nn.Linear(len(m), len(m)) for m in regions.values())
        self.register_buffer("ring_laplacian", rescaled_laplacian(ring_adjacency(R)))
        self.ring_coefficients = nn.Parameter(torch.empty(3))

        # 4. global node
        self.global_attention = nn.Linear(R, R)
        self.global_attention_latter = nn.Linear(R, R)

        # 5. classifier over the C + R + 1 nodes
        self.classifier = nn.Linear(C + R + 1, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Keras defaults: glorot-uniform kernels, zero biases (fan sizes as Keras counts them).
        def glorot(t, fan_in, fan_out):
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            nn.init.uniform_(t, -bound, bound)

        F1, k = self.temporal.shape
        glorot(self.temporal, k, k * F1)
        glorot(self.mix, F1, F1)
        glorot(self.depthwise.weight, 5, 5)
        glorot(self.node_coefficients, 3, 3)  # Keras add_weight default initializer
        glorot(self.ring_coefficients, 3, 3)
        for dw, pw in zip(self.node_depthwise, self.node_pointwise):
            n = dw.weight.shape[0]
            glorot(dw.weight, 5, 5)
            glorot(pw.weight, n, n)
        for lin in [*self.region_attention, *self.region_attention_latter, self.global_attention,
                    self.global_attention_latter, self.classifier]:
            glorot(lin.weight, lin.in_features, lin.out_features)
            nn.init.zeros_(lin.bias)
        for bn in (self.bn1, self.bn2, self.node_bn):
            bn.reset_parameters()

    @torch.no_grad()
    def constrain_(self) -> None:
        """Apply the official max_norm(1) constraints (Keras axis 0); call after each optimiser step."""
        self.mix.clamp_(-1.0, 1.0)  # kernel (1, F1): axis 0 has length 1
        _max_norm_(self.depthwise.weight, dim=2)  # 5 taps per electrode
        for pw in self.node_pointwise:
            pw.weight.clamp_(-1.0, 1.0)  # pointwise kernel (1, n, n): axis 0 has length 1

    # ---- the graph steps, on affectkit ops or stock PyTorch --------------------------------

    def _cheb(self, x: torch.Tensor, laplacian: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """sum_k theta_k T_k(L) x over (B, n, T)."""
        if self.backend == "affectkit":
            return ops.cheb_graph_conv(x, laplacian, theta)
        Lx = laplacian @ x
        return theta[0] * x + theta[1] * Lx + theta[2] * (2 * (laplacian @ Lx) - x)

    def _attention_pool(self, x: torch.Tensor, scores: torch.Tensor, assignment: torch.Tensor, parents: int):
        """(B, N, T) children -> (B, P, T) parents, weighted by the softmax of scores over siblings."""
        if self.backend == "affectkit":
            return ops.hierarchical_pool(x, assignment, scores, parents)
        out = []
        for p in range(parents):
            idx = (assignment == p).nonzero().squeeze(1)
            w = torch.softmax(scores[:, idx], dim=1)
            out.append((w.unsqueeze(-1) * x[:, idx]).sum(1))
        return torch.stack(out, 1)

    def _region_scores(self, x: torch.Tensor, dense: nn.ModuleList) -> torch.Tensor:
        """(B, C) attention logits: each region's dense map of its electrodes' time-means."""
        pooled = x.mean(-1)
        scores = torch.cat([lin(pooled[:, getattr(self, f"members_{r}")]) for r, lin in enumerate(dense)], 1)
        return scores[:, self.region_inverse]  # back to channel order

    # ---- forward -----------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, samples) -> (B, C + R + 1) time-averaged node features before the classifier."""
        if x.dim() != 3 or x.shape[1] != len(self.channels):
            raise ValueError(f"x: expected (batch, {len(self.channels)} channels, samples), got shape {tuple(x.shape)}")
        B, C, _ = x.shape
        R = len(self.region_names)
        # 1. The F1 temporal maps followed by the per-electrode mix are one kernel per electrode.
        kernel = (self.mix @ self.temporal).unsqueeze(1)  # (C, 1, ksize)
        k = kernel.shape[-1]
        h = F.conv1d(F.pad(x, ((k - 1) // 2, k // 2)), kernel, groups=C)  # Keras "same": extra tap on the right
        h = F.elu(self.bn1(h))
        h = F.elu(self.bn2(self.depthwise(h)))
        h = self.drop(F.avg_pool1d(h, 2))  # (B, C, T)

        # 2. Node level, region by region.
        parts = []
        for r in range(R):
            members = getattr(self, f"members_{r}")
            g = self._cheb(h[:, members], getattr(self, f"laplacian_{r}"), self.node_coefficients[r])
            parts.append(self.node_pointwise[r](self.node_depthwise[r](g)))
        agg = torch.cat(parts, 1)[:, self.region_inverse]
        agg = F.elu(self.node_bn(agg))
        nodes = h + agg

        # 3. Regions: attention-pooled front end (ring-filtered) plus attention-pooled node output.
        regions = self._attention_pool(h, self._region_scores(h, self.region_attention), self.assignment, R)
        regions_latter = self._attention_pool(agg, self._region_scores(agg, self.region_attention_latter),
                                              self.assignment, R)
        region_out = self._cheb(regions, self.ring_laplacian, self.ring_coefficients) + regions_latter

        # 4. Global node from both region signals.
        g1 = self._attention_pool(regions, self.global_attention(regions.mean(-1)), self.global_assignment, 1)
        g2 = self._attention_pool(regions_latter, self.global_attention_latter(regions_latter.mean(-1)),
                                  self.global_assignment, 1)
        # 5. All levels together, averaged over time.
        fused = torch.cat([nodes, region_out, g1 + g2], 1)
        return fused.mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.features(x)))

    def extra_repr(self) -> str:
        return f"channels={len(self.channels)}, regions={len(self.region_names)}, backend={self.backend!r}"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
