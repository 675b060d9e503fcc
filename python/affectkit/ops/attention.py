"""cross_modal_attention: fused multi-head attention for one modality querying another.

One custom op serves the padded form (B, H, L, D) with optional valid lengths and the packed
(varlen) form (total, H, D) with cumulative offsets; its backward is a second op that
recomputes the probabilities from the saved row logsumexp.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _C
from ._bridge import (
    CUDA_FLOAT_DTYPES,
    INDEX_DTYPES,
    affectkit_op,
    check_same_device,
    check_tensor,
    call_direct_or_op as _call,
    checks_values,
    device_code,
    dtype_code,
    ptr,
    register_autograd,
    stream_handle,
)

MAX_HEAD_DIM = 256
# bfloat16 on the CPU runs the float32 kernels on widened copies (float32 accumulation).
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

# ---------------------------------------------------------------------------------------
# Public functions: validation that traces under torch.compile, then the op.
# ---------------------------------------------------------------------------------------


def cross_modal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lengths: Optional[torch.Tensor] = None,
    q_lengths: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool | str = False,
):
    """softmax(scale * q k^T + masks) v for every batch element and head, fused.

    Args:
        q: (B, H, Lq, D); k: (B, H, Lk, D); v: (B, H, Lk, Dv). D and Dv in [1, 256];
            float32/float64/bfloat16 on CPU (bfloat16 accumulates in float32), also float16 on
            CUDA. Any strides.
        kv_lengths, q_lengths: optional (B,) int32/int64 valid lengths on q's device. Keys at
            or past kv_lengths[b] are ignored; query rows at or past q_lengths[b] are zeros.
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to
            (B, H, Lq, Lk). An additive mask that requires grad gets its gradient (summed
            over its broadcast axes; zero where a key is invisible); a bool mask gets none.
        causal: key j is visible to query i iff j <= i + (Lk - Lq) (bottom-right aligned).
        scale: multiplies q k^T; default 1 / sqrt(D).
        dropout_p: dropout on the probabilities in [0, 1), applied whenever > 0; the mask is a
            hash of a seed drawn from torch's default generator (torch.manual_seed makes it
            reproducible) and of (b, h, i, j), identical in forward and backward.
        need_weights: also return the head-averaged probabilities (B, Lq, Lk) (after dropout,
            not differentiable); "per_head" returns them per head, (B, H, Lq, Lk).

    A query row with no visible key gives zeros (never NaN) and zero gradients.

    Returns:
        out (B, H, Lq, Dv), or (out, weights) when need_weights.
    """
    _check_qkv(q, k, v, packed=False)
    if need_weights:
        _average_heads(need_weights)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kv_lengths = _check_lengths("kv_lengths", kv_lengths, q, B)
    q_lengths = _check_lengths("q_lengths", q_lengths, q, B)
    mask = _prepare_mask(attn_mask, q, (B, H, Lq, Lk))
    scale = _check_scale(scale, D)
    seed = _draw_seed(dropout_p)
    out, lse = _call(_attention_impl, torch.ops.affectkit.cross_modal_attention,
                     q, k, v, kv_lengths, q_lengths, None, None, Lq, Lk, mask, bool(causal), scale, float(dropout_p),
                     seed, function=_attention.function)
    if not need_weights:
        return out
    weights = _call(_attention_weights_impl, torch.ops.affectkit.cross_modal_attention_weights,
                    q.detach(), k.detach(), lse.detach(), kv_lengths, q_lengths, None, None, Lq, Lk, _detached(mask),
                    bool(causal), scale, float(dropout_p), seed, _average_heads(need_weights))
    return out, weights


def cross_modal_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    attn_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    need_weights: bool | str = False,
):
    """The packed form of :func:`cross_modal_attention`: sequences laid end to end, no padding.

    Args:
        q: (total_q, H, D); k: (total_k, H, D); v: (total_k, H, Dv).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32/int64 offsets, from 0 to total, non-decreasing;
            sequence b holds rows [cu[b], cu[b + 1]).
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths.
        attn_mask: optional, broadcastable to (B, H, max_seqlen_q, max_seqlen_k), indexed by
            positions within each sequence.
        causal: bottom-right aligned per sequence: j <= i + (len_k[b] - len_q[b]).

    Returns:
        out (total_q, H, Dv), or (out, weights (B, max_seqlen_q, max_seqlen_k)) when need_weights.
    """
    _check_qkv(q, k, v, packed=True)
    if need_weights:
        _average_heads(need_weights)
    H, D = q.shape[1], q.shape[2]
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES)
        check_same_device(name, cu, "q", q)
        if cu.shape[0] < 1:
            raise ValueError(f"{name}: expected B + 1 >= 1 offsets, got 0")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} offsets (as cu_seqlens_q), got {cu_seqlens_k.shape[0]}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}: expected a value >= 0, got {value}")
    B = cu_seqlens_q.shape[0] - 1
    mask = _prepare_mask(attn_mask, q, (B, H, max_seqlen_q, max_seqlen_k))
    scale = _check_scale(scale, D)
    seed = _draw_seed(dropout_p)
    out, lse = _call(_attention_impl, torch.ops.affectkit.cross_modal_attention,
                     q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bool(causal),
                     scale, float(dropout_p), seed, function=_attention.function)
    if not need_weights:
        return out
    weights = _call(_attention_weights_impl, torch.ops.affectkit.cross_modal_attention_weights,
                    q.detach(), k.detach(), lse.detach(), None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, _detached(mask), bool(causal), scale, float(dropout_p), seed,
                    _average_heads(need_weights))
    return out, weights


def _average_heads(need_weights) -> bool:
    if need_weights is True:
        return True
    if need_weights == "per_head":
        return False
    raise ValueError(f"need_weights: expected False, True or 'per_head', got {need_weights!r}")


def _check_qkv(q, k, v, *, packed: bool) -> None:
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        allowed = CUDA_FLOAT_DTYPES if isinstance(t, torch.Tensor) and t.is_cuda else CPU_DTYPES
        if isinstance(t, torch.Tensor) and t.dim() == ndim and t.dtype in allowed:
            continue  # the common case in one test (this runs on every call)
        check_tensor(name, t, ndim=ndim)
        check_tensor(name, t, dtypes=CUDA_FLOAT_DTYPES if t.is_cuda else CPU_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_same_device(name, t, "q", q)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {str(q.dtype).removeprefix('torch.')} (the dtype of q), "
                            f"got {str(t.dtype).removeprefix('torch.')}")
    if packed:
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"k: expected H = {q.shape[1]} heads (as q), got shape {tuple(k.shape)}")
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(f"v: expected (total_k, H) = {tuple(k.shape[:2])} (as k), got shape {tuple(v.shape)}")
    else:
        if k.shape[:2] != q.shape[:2]:
            raise ValueError(f"k: expected (B, H) = {tuple(q.shape[:2])} (as q), got shape {tuple(k.shape)}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v: expected (B, H, Lk) = {tuple(k.shape[:3])} (as k), got shape {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head dimension D = {q.shape[-1]} (as q), got {k.shape[-1]}")
    for name, t in (("q", q), ("v", v)):
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected a head dimension in [1, {MAX_HEAD_DIM}], got {t.shape[-1]}")


def _check_lengths(name, lengths, q, B):
    if lengths is None:
        return None
    check_tensor(name, lengths, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device(name, lengths, "q", q)
    if lengths.shape[0] != B:
        raise ValueError(f"{name}: expected {B} entries (q.shape[0]), got {lengths.shape[0]}")
    return lengths


def _prepare_mask(attn_mask, q, target):
    """Bool masks pass as they are; additive masks become the accumulation dtype; 4-D view."""
    if attn_mask is None:
        return None
    check_tensor("attn_mask", attn_mask)
    check_same_device("attn_mask", attn_mask, "q", q)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected dtype bool or a floating dtype, got {str(attn_mask.dtype).removeprefix('torch.')}")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask: expected at most 4 dimensions, broadcastable to {tuple(target)}, got shape {tuple(attn_mask.shape)}")
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    for got, want in zip(shape, target):
        if got != 1 and got != want:
            raise ValueError(f"attn_mask: expected a shape broadcastable to {tuple(target)}, got {tuple(attn_mask.shape)}")
    mask = attn_mask.reshape(shape)
    if mask.dtype != torch.bool:
        mask = mask.to(torch.float64 if q.dtype == torch.float64 else torch.float32)  # differentiable
    return mask


def _detached(mask):
    return None if mask is None else mask.detach()


def _check_scale(scale, D) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def _draw_seed(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# The ops: contiguous-enough inputs, output allocation, the call into the core.
# ---------------------------------------------------------------------------------------


def _feature_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _view(t: torch.Tensor, packed: bool):
    """(data_ptr, stride_b, stride_h, stride_row) for the core, in elements; also for lse,
    (B, H, L) or (total, H). One stride() call: this runs five to ten times per op call, where
    Python overhead is most of the cost of a small attention."""
    st = t.stride()
    if packed:  # (total, H, ...): batch offsets come from cu_seqlens
        return (ptr(t), 0, st[1], st[0])
    return (ptr(t), st[0], st[1], st[2])


def _mask_view(mask, B, H, Lq, Lk):
    if mask is None:
        return (0, _C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    m = mask.expand(B, H, Lq, Lk)  # size-1 axes get stride 0
    return (ptr(m), dtype_code(m), *m.stride())


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index(q, kv_lengths, q_lengths, cu_q, cu_k, max_q, max_k, total_q, total_k, validate=True):
    """The (q_lengths, kv_lengths, cu_q, cu_k, total_q, total_k) tuple; keeps tensors alive.
    On CUDA, with `validate`, their values are checked with a single copy back to the host (the
    CPU core checks values itself)."""
    keep = []

    def prep(t):
        if t is None:
            return 0
        t = t.to(torch.int64).contiguous()
        keep.append(t)
        return ptr(t)

    index = (prep(q_lengths), prep(kv_lengths), prep(cu_q), prep(cu_k), total_q, total_k)
    if validate and q.is_cuda and checks_values(q):
        _check_index_values([("q_lengths", q_lengths, max_q), ("kv_lengths", kv_lengths, max_k)],
                            [("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)])
    return index, keep


def _check_index_values(lengths, offsets):
    """Raise ValueError for lengths outside [0, upper] or offsets that are not 0 .. total,
    non-decreasing, with no sequence longer than max_len. Every statistic is gathered into one
    tensor and read back once: each read back waits for the GPU, and a call with q and kv
    lengths used to wait four times."""
    parts, checks = [], []
    for name, t, upper in lengths:
        if t is not None and t.numel():
            parts += torch.aminmax(t.to(torch.int64))
            checks.append(("lengths", name, t, upper))
    for name, cu, total, max_len in offsets:
        if cu is not None:
            cu = cu.to(torch.int64)
            seg = cu[1:] - cu[:-1]
            lo, hi = torch.aminmax(seg) if seg.numel() else (cu[0] * 0, cu[0] * 0)
            parts += (cu[0], cu[-1], lo, hi)
            checks.append(("offsets", name, cu, (total, max_len)))
    if not parts:
        return
    values = torch.stack(parts).tolist()
    for kind, name, t, bounds in checks:
        if kind == "lengths":
            (lo, hi), values = values[:2], values[2:]
            if lo < 0 or hi > bounds:
                raise ValueError(f"{name}: expected values in [0, {bounds}], got {lo if lo < 0 else hi}")
        else:
            (first, last, lo, hi), values = values[:4], values[4:]
            total, max_len = bounds
            if first != 0 or last != total or lo < 0 or hi > max_len:
                raise ValueError(f"{name}: expected offsets from 0 to {total}, non-decreasing, each sequence at "
                                 f"most {max_len} rows, got {t.cpu().tolist()}")


def _problem(q, k, v, kv_lengths, q_lengths, cu_q, cu_k, max_q, max_k, validate=True):
    packed = cu_q is not None
    if packed:
        B, H = cu_q.shape[0] - 1, q.shape[1]
        total_q, total_k = q.shape[0], k.shape[0]
    else:
        B, H = q.shape[0], q.shape[1]
        total_q = total_k = 0
    dims = (B, H, max_q, max_k, q.shape[-1], v.shape[-1])
    index, keep = _index(q, kv_lengths, q_lengths, cu_q, cu_k, max_q, max_k, total_q, total_k, validate)
    return packed, dims, index, keep


def _seed_value(seed, dropout_p) -> int:
    return int(seed.reshape(-1)[0].item()) if (seed is not None and dropout_p > 0) else 0


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: Optional[torch.Tensor],
    q_lengths: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[torch.Tensor], causal: bool, scale: float,
    dropout_p: float, seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_feature_contiguous(t) for t in (q, k, v))
    packed, dims, index, keep = _problem(q, k, v, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    _C.attention_forward(
        device_code(q), dtype_code(q), dims, index, causal, scale, dropout_p, _seed_value(seed, dropout_p),
        _view(q, packed), _view(k, packed), _view(v, packed), _mask_view(attn_mask, *dims[:4]),
        _view(out, packed), _view(lse, packed), stream_handle(q),
    )
    del keep
    return out, lse


_attention = affectkit_op("affectkit::cross_modal_attention")(_attention_impl)


@_attention.register_fake
def _(q, k, v, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, causal,
      scale, dropout_p, seed):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    return out, lse


def _attention_backward_impl(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_lengths: Optional[torch.Tensor], q_lengths: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[torch.Tensor],
    causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor], mask_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_q, grad_k, grad_v and, when mask_grad, the gradient of the additive attn_mask in
    attn_mask's (4-D, broadcast) shape; else an empty (0,) tensor in its place."""
    q, k, v, out, grad_out = (_feature_contiguous(t) for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    # The forward checked these values (on CUDA each check waits for the GPU); the kernels clamp
    # indices read from them in any case.
    packed, dims, index, keep = _problem(q, k, v, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, validate=False)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # The kernel writes the score gradient of every (b, h, i, j); summing it over the mask's
    # broadcast axes gives the mask's gradient.
    _check_mask_grad(mask_grad, attn_mask)
    full = q.new_empty(dims[:4], dtype=_acc_dtype(q.dtype)) if mask_grad else None
    _C.attention_backward(
        device_code(q), dtype_code(q), dims, index, causal, scale, dropout_p, _seed_value(seed, dropout_p),
        _view(q, packed), _view(k, packed), _view(v, packed), _mask_view(attn_mask, *dims[:4]),
        _view(out, packed), _view(grad_out, packed), _view(lse, packed),
        _view(grad_q, packed), _view(grad_k, packed), _view(grad_v, packed), ptr(full) if mask_grad else 0,
        stream_handle(q),
    )
    del keep
    if not mask_grad:
        return grad_q, grad_k, grad_v, q.new_empty((0,), dtype=_acc_dtype(q.dtype))
    axes = [d for d in range(4) if attn_mask.shape[d] == 1 and dims[d] != 1]
    grad_mask = full.sum(axes, keepdim=True) if axes else full
    return grad_q, grad_k, grad_v, grad_mask.reshape(attn_mask.shape)


_attention_backward = affectkit_op("affectkit::cross_modal_attention_backward")(_attention_backward_impl)


def _check_mask_grad(mask_grad, attn_mask):
    if mask_grad and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.dim() != 4):
        got = "None" if attn_mask is None else f"dtype {attn_mask.dtype}, shape {tuple(attn_mask.shape)}"
        raise ValueError(f"mask_grad: expected a 4-D additive float attn_mask to differentiate, got {got}")


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      attn_mask, causal, scale, dropout_p, seed, mask_grad=False):
    _check_mask_grad(mask_grad, attn_mask)
    grad_mask = (attn_mask.new_empty(attn_mask.shape) if mask_grad
                 else q.new_empty((0,), dtype=_acc_dtype(q.dtype)))
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device), grad_mask)


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_lengths, q_lengths, cu_q, cu_k, max_q, max_k, mask, causal, scale, dropout_p, seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lengths, q_lengths, cu_q, cu_k, mask, seed)
    ctx.args = (max_q, max_k, causal, scale, dropout_p)
    ctx.mark_non_differentiable(lse)
    # A float mask that requires grad (a bool one never can): the backward also returns dS.
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_lengths, q_lengths, cu_q, cu_k, mask, seed = ctx.saved_tensors
    max_q, max_k, causal, scale, dropout_p = ctx.args
    grad_q, grad_k, grad_v, grad_mask = _call(
        _attention_backward_impl, torch.ops.affectkit.cross_modal_attention_backward,
        grad_out, q, k, v, out, lse, kv_lengths, q_lengths, cu_q, cu_k, max_q, max_k, mask, causal, scale,
        dropout_p, seed, ctx.mask_grad,
    )
    grad_mask = grad_mask if ctx.mask_grad else None
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, grad_mask, None, None, None, None


register_autograd(_attention, _backward, _setup_context)


def _attention_weights_impl(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kv_lengths: Optional[torch.Tensor],
    q_lengths: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[torch.Tensor], causal: bool, scale: float,
    dropout_p: float, seed: Optional[torch.Tensor], average_heads: bool = True,
) -> torch.Tensor:
    q, k = _feature_contiguous(q), _feature_contiguous(k)
    lse = lse.contiguous()
    # Called right after the forward, which checked these values.
    packed, dims, index, keep = _problem(q, k, k, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, validate=False)
    heads = () if average_heads else (dims[1],)
    weights = q.new_empty((dims[0], *heads, max_seqlen_q, max_seqlen_k))
    _C.attention_weights(
        device_code(q), dtype_code(q), dims, index, causal, scale, dropout_p, _seed_value(seed, dropout_p),
        _view(q, packed), _view(k, packed), _mask_view(attn_mask, *dims[:4]), _view(lse, packed),
        ptr(weights), average_heads, stream_handle(q),
    )
    del keep
    return weights


_attention_weights = affectkit_op("affectkit::cross_modal_attention_weights")(_attention_weights_impl)


@_attention_weights.register_fake
def _(q, k, lse, kv_lengths, q_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, causal,
      scale, dropout_p, seed, average_heads=True):
    B = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    heads = () if average_heads else (q.shape[-2] if cu_seqlens_q is not None else q.shape[1],)
    return q.new_empty((B, *heads, max_seqlen_q, max_seqlen_k))
