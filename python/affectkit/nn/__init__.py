"""torch.nn modules built on affectkit's ops."""

from .attention import CrossModalAttention, MultimodalFusion
from .graph import ChebGraphConv, ElectrodeHierarchy, GraphConv, HierarchicalPool

__all__ = [
    "CrossModalAttention",
    "MultimodalFusion",
    "GraphConv",
    "ChebGraphConv",
    "HierarchicalPool",
    "ElectrodeHierarchy",
]
