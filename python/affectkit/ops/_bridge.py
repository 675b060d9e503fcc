"""Passing torch tensors to the torch-free core: pointers, codes, streams, checks."""

from __future__ import annotations

from typing import Iterable

import torch

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


def check_lengths_range(name: str, lengths: torch.Tensor, upper: int) -> None:
    """Values must lie in [0, upper]. On CUDA this reads two numbers back (one sync)."""
    if lengths.numel() == 0:
        return
    lo, hi = torch.aminmax(lengths)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected values in [0, {upper}], got {bad}")
