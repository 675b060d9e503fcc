"""masked_mean: mean over the valid prefix of ragged sequences (utterance pooling)."""

from __future__ import annotations

import torch

from .. import _C
from ._bridge import (
    INDEX_DTYPES,
    affectkit_op,
    call_direct_or_op,
    check_float_dtype,
    check_lengths_range,
    check_same_device,
    check_tensor,
    device_code,
    dtype_code,
    ptr,
    register_autograd,
    stream_handle,
)


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of ``x[b, :lengths[b]]`` for every sequence b.

    Args:
        x: (B, L, F) floating tensor (float32/float64 on CPU; also float16/bfloat16 on CUDA).
        lengths: (B,) int32 or int64 tensor on x's device, values in [0, L].

    Returns:
        (B, F) tensor; rows whose length is 0 are zeros (and get zero gradient).
    """
    check_tensor("x", x, ndim=3)
    check_float_dtype("x", x)
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device("lengths", lengths, "x", x)
    if lengths.shape[0] != x.shape[0]:
        raise ValueError(f"lengths: expected {x.shape[0]} entries (x.shape[0]), got {lengths.shape[0]}")
    # Plain eager calls skip the dispatcher (see call_direct_or_op).
    return call_direct_or_op(_masked_mean.plain, torch.ops.affectkit.masked_mean, x, lengths,
                             function=_masked_mean.function)


def _prepare_lengths(lengths: torch.Tensor, L: int) -> torch.Tensor:
    lengths = lengths.to(torch.int64).contiguous()
    if lengths.is_cuda:  # the CPU core checks values itself
        check_lengths_range("lengths", lengths, L)
    return lengths


@affectkit_op("affectkit::masked_mean")
def _masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    B, L, F = x.shape
    lengths = _prepare_lengths(lengths, L)
    out = x.new_empty((B, F))
    _C.masked_mean_forward(device_code(x), dtype_code(x), ptr(x), ptr(lengths), ptr(out), B, L, F, stream_handle(x))
    return out


@_masked_mean.register_fake
def _(x, lengths):
    return x.new_empty((x.shape[0], x.shape[2]))


@affectkit_op("affectkit::masked_mean_backward")
def _masked_mean_backward(grad_out: torch.Tensor, lengths: torch.Tensor, L: int) -> torch.Tensor:
    grad_out = grad_out.contiguous()
    B, F = grad_out.shape
    lengths = _prepare_lengths(lengths, L)
    grad_x = grad_out.new_empty((B, L, F))
    _C.masked_mean_backward(
        device_code(grad_out), dtype_code(grad_out), ptr(grad_out), ptr(lengths), ptr(grad_x), B, L, F,
        stream_handle(grad_out),
    )
    return grad_x


@_masked_mean_backward.register_fake
def _(grad_out, lengths, L):
    return grad_out.new_empty((grad_out.shape[0], L, grad_out.shape[1]))


def _setup_context(ctx, inputs, output):
    x, lengths = inputs
    ctx.save_for_backward(lengths)
    ctx.L = x.shape[1]


def _backward(ctx, grad_out):
    (lengths,) = ctx.saved_tensors
    return call_direct_or_op(_masked_mean_backward.plain, torch.ops.affectkit.masked_mean_backward,
                             grad_out, lengths, ctx.L), None


register_autograd(_masked_mean, _backward, _setup_context)


# The backward is linear in grad_out, and its adjoint is masked_mean itself:
# registering it makes double backward (gradgradcheck) work.
def _setup_backward_context(ctx, inputs, output):
    _, lengths, _ = inputs
    ctx.save_for_backward(lengths)


def _backward_backward(ctx, grad_grad_x):
    (lengths,) = ctx.saved_tensors
    return torch.ops.affectkit.masked_mean(grad_grad_x, lengths), None, None


_masked_mean_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)
