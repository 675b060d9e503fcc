"""Passing torch tensors to the torch-free core: pointers, codes, streams, checks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils import _python_dispatch

from .. import _C

_DTYPE_CODES = {
    torch.float32: _C.DTYPE_CODES["float32"],
    torch.float64: _C.DTYPE_CODES["float64"],
    torch.float16: _C.DTYPE_CODES["float16"],
    torch.bfloat16: _C.DTYPE_CODES["bfloat16"],
    torch.int32: _C.DTYPE_CODES["int32"],
    torch.int64: _C.DTYPE_CODES["int64"],
    torch.bool: _C.DTYPE_CODES["bool"],
}

CPU_FLOAT_DTYPES = (torch.float32, torch.float64)
CUDA_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


def device_code(t: torch.Tensor) -> int:
    return _C.DEVICE_CUDA if t.is_cuda else _C.DEVICE_CPU


def stream_handle(t: torch.Tensor) -> int:
    """The current torch CUDA stream on t's device, as an integer (0 on CPU)."""
    if not t.is_cuda:
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr() if t.numel() else 0


def check_tensor(name: str, value, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None) -> None:
    """Raise TypeError/ValueError naming `name` when `value` is not the tensor we need."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name}: expected dtype {names}, got {str(value.dtype).removeprefix('torch.')}")


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    allowed = CUDA_FLOAT_DTYPES if t.is_cuda else CPU_FLOAT_DTYPES
    check_tensor(name, t, dtypes=allowed)


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def checks_values(t: torch.Tensor) -> bool:
    """Whether to check data-dependent values of a CUDA tensor on the host now.

    Reading values back synchronises, which CUDA graph capture forbids; while a graph is being
    captured the checks are skipped (every kernel clamps indices read from data, so unchecked
    values cannot touch memory out of bounds: they give clamped, not undefined, results)."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def affectkit_op(name: str):
    """torch.library.custom_op for a CPU/CUDA op that mutates nothing; the op keeps its plain
    implementation as `.plain` for call_direct_or_op."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=(), device_types=("cpu", "cuda"))(fn)
        op.plain = fn
        return op

    return register


def register_autograd(op, backward, setup_context):
    """op.register_autograd, plus op.function: an autograd.Function with the same forward
    (op.plain), context and backward, which call_direct_or_op uses for eager calls that need
    a gradient."""
    op.register_autograd(backward, setup_context=setup_context)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = op.plain(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{op.plain.__name__}_function"
    op.function = Function


def call_direct_or_op(impl, op, *args, function=None):
    """op(*args), the registered custom op, or a shortcut to the same code when nothing needs
    the dispatcher: eager execution (not traced by torch.compile or torch.jit.trace, no
    functorch transform), plain tensors (no FakeTensor or other subclass) and no active
    torch-function or dispatch mode. The shortcut is impl(*args), the op's own implementation,
    when there is no autograd graph to record, else function.apply(*args), an
    autograd.Function with the op's own backward. The custom-op machinery costs about 300 us
    of Python per differentiable call on a 2-core machine (40 us without grad), which
    dominates small GPU calls."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if (torch.compiler.is_compiling()
            or any(type(t) is not torch.Tensor for t in tensors)
            or torch._C._is_torch_function_mode_enabled()
            or _python_dispatch._get_current_dispatch_mode() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):  # torch.jit.trace records the op
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return op(*args) if function is None else function.apply(*args)
    return impl(*args)


def check_lengths_range(name: str, lengths: torch.Tensor, upper: int) -> None:
    """Values must lie in [0, upper]. On CUDA this reads two numbers back (one sync), except
    during CUDA graph capture (see checks_values)."""
    if lengths.numel() == 0 or not checks_values(lengths):
        return
    lo, hi = torch.stack(torch.aminmax(lengths)).tolist()  # one copy back, not two
    if lo < 0 or hi > upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected values in [0, {upper}], got {bad}")
