"""Torch custom ops over the affectkit core (namespace ``torch.ops.affectkit``).

Each op has a fake (meta) implementation for torch.compile, an autograd formula whose
backward is an op of its own, a CPU kernel and, when CUDA was compiled, a CUDA kernel
that runs on ``torch.cuda.current_stream()``.
"""

from .attention import cross_modal_attention, cross_modal_attention_varlen
from .graph import cheb_graph_conv, graph_conv, graph_conv_pool, hierarchical_pool
from .knn import filtered_knn
from .pooling import masked_mean

__all__ = [
    "masked_mean",
    "cross_modal_attention",
    "cross_modal_attention_varlen",
    "graph_conv",
    "cheb_graph_conv",
    "hierarchical_pool",
    "graph_conv_pool",
    "filtered_knn",
]
