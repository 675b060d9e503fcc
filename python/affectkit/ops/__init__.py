"""Torch custom ops over the affectkit core (namespace ``torch.ops.affectkit``).

Each op has a fake (meta) implementation for torch.compile, an autograd formula whose
backward is an op of its own, a CPU kernel and, when CUDA was compiled, a CUDA kernel
that runs on ``torch.cuda.current_stream()``.
"""

from .knn import filtered_knn
from .pooling import masked_mean

__all__ = ["masked_mean"]
__all__ += ["filtered_knn"]
