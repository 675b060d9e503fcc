"""Torch custom ops over the affectkit core (namespace ``torch.ops.affectkit``).

Each op has a fake (meta) implementation for torch.compile, an autograd formula whose
backward is an op of its own, a CPU kernel and, when CUDA was compiled, a CUDA kernel
that runs on ``torch.cuda.current_stream()``.
"""

from .pooling import masked_mean
from .attention import cross_modal_attention, cross_modal_attention_varlen

__all__ = ["masked_mean"]
__all__ += ["cross_modal_attention", "cross_modal_attention_varlen"]
