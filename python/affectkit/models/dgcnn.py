"""DGCNN (Song, Zheng, Song & Cui, 2018): a Chebyshev graph network over differential-entropy
features whose electrode adjacency is learned with the rest of the model.

Input (batch, channels, bands) -> batch norm of the band features -> learned symmetric
non-negative adjacency A -> Chebyshev filter on ``L~ = 2 L / 2 - I = -D^-1/2 A D^-1/2``
(normalised Laplacian, lambda_max taken as 2 as in ChebNet/DGCNN) with (K, bands, hidden)
weights -> ReLU -> flatten -> dense -> ReLU -> dropout -> dense -> logits.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..eeg.adjacency import LearnedAdjacency, gcn_normalize, knn_adjacency
from ..eeg.montage import standard_montage
from ..nn.graph import ChebGraphConv


class DGCNN(nn.Module):
    """DGCNN for (batch, channels, bands) features; works for any channel count (SEED 62, DEAP 32, DREAMER 14).

    Args:
        channels: channel names (the adjacency starts from their 4-nearest-neighbour graph on the
            standard 10-05 montage, plus a little noise) or a count (random start).
        bands: features per electrode (5 DE bands).
        num_classes: 3 for SEED, 2 for DEAP high/low, 5 for DREAMER scores.
        hidden: graph filter outputs per electrode; K: Chebyshev terms; dropout before the last layer.

    Example:
        >>> from affectkit.eeg import SEED_CHANNELS
        >>> DGCNN(SEED_CHANNELS, num_classes=3)(torch.randn(4, 62, 5)).shape
        torch.Size([4, 3])
    """

    def __init__(self, channels: Union[int, Sequence[str]], bands: int = 5, num_classes: int = 3,
                 hidden: int = 32, K: int = 2, dense: int = 64, dropout: float = 0.5):
        super().__init__()
        if isinstance(channels, int):
            if channels < 1:
                raise ValueError(f"channels: expected a count >= 1 or channel names, got {channels}")
            n, init = channels, torch.rand(channels, channels)
        else:
            names = list(channels)
            n = len(names)
            init = knn_adjacency(standard_montage(names), k=4) + 0.01 * torch.rand(n, n)
        self.num_channels, self.bands, self.num_classes = n, bands, num_classes
        self.norm = nn.BatchNorm1d(bands)
        self.adjacency = LearnedAdjacency(init, normalize=False)
        self.cheb = ChebGraphConv(bands, hidden, K=K)
        self.fc1 = nn.Linear(n * hidden, dense)
        self.fc2 = nn.Linear(dense, num_classes)
        self.drop = nn.Dropout(dropout)

    def laplacian(self) -> torch.Tensor:
        """The rescaled normalised Laplacian of the current learned adjacency."""
        return -gcn_normalize(self.adjacency(), add_self_loops=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.num_channels, self.bands):
            raise ValueError(f"x: expected (batch, {self.num_channels} channels, {self.bands} bands), "
                             f"got shape {tuple(x.shape)}")
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        h = F.relu(self.cheb(x, self.laplacian().to(x.dtype)))
        h = F.relu(self.fc1(h.flatten(1)))
        return self.fc2(self.drop(h))
