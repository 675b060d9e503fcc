"""Torch custom ops over the affectkit core (namespace ``torch.ops.affectkit``).

Each op has a fake (meta) implementation for torch.compile, an autograd formula whose
backward is an op of its own, a CPU kernel and, when CUDA was compiled, a CUDA kernel
that runs on ``torch.cuda.current_stream()``.
"""

from .pooling import masked_mean
from .graph import cheb_graph_conv, graph_conv, graph_conv_pool, hierarchical_pool

__all__ = ["masked_mean"]
__all__ += ["graph_conv", "cheb_graph_conv", "hierarchical_pool", "graph_conv_pool"]
