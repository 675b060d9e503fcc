"""torch.nn modules built on affectkit's ops."""

from .graph import ChebGraphConv, ElectrodeHierarchy, GraphConv, HierarchicalPool

__all__: list[str] = []
__all__ += ["GraphConv", "ChebGraphConv", "HierarchicalPool", "ElectrodeHierarchy"]
