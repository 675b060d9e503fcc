"""Graph convolution over small graphs with huge batches (EEG electrodes, scalp regions).

``graph_conv``, ``cheb_graph_conv``, ``hierarchical_pool`` and the fused level
``graph_conv_pool``. Node features are ``(..., N, F)`` with any number of leading batch and
time dimensions; the kernels see them flattened to ``(S, N, F)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _C
from ._finite import check_finite_graph, finish_finite_check, pending_finite_check
from ._bridge import (
    INDEX_DTYPES,
    affectkit_op,
    call_direct_or_op,
    check_float_dtype,
    check_same_device,
    check_tensor,
    checks_values,
    device_code,
    dtype_code,
    ptr,
    register_autograd,
    stream_handle,
)

ACTIVATIONS = {None: 0, "relu": 1, "elu": 2, "leaky_relu": 3, "tanh": 4, "sigmoid": 5}
"""Activation names accepted by ``graph_conv`` (leaky_relu has slope 0.01, elu alpha 1)."""


# --------------------------------------------------------------------------------------
# Argument checks (cheap, shape-only: they trace under torch.compile)
# --------------------------------------------------------------------------------------


def _activation_code(activation) -> int:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation: expected None or a name, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(k) for k in ACTIVATIONS)
        raise ValueError(f"activation: expected one of {names}, got {activation!r}")
    return ACTIVATIONS[activation]


def _check_nodes(x: torch.Tensor) -> None:
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor (..., N, F) with at least 2 dimensions, got shape {tuple(x.shape)}")
    check_float_dtype("x", x)


def _check_like_x(name: str, t, x: torch.Tensor) -> None:
    check_tensor(name, t)
    check_same_device(name, t, "x", x)
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {str(x.dtype).removeprefix('torch.')} (the dtype of x), "
                        f"got {str(t.dtype).removeprefix('torch.')}")


def _check_square(name: str, a: torch.Tensor, N: int, allow_batch: bool) -> None:
    square = a.dim() >= 2 and a.shape[-1] == a.shape[-2]
    if not square or a.dim() > (3 if allow_batch else 2):
        want = "(N, N) or a batch (B, N, N)" if allow_batch else "(N, N)"
        raise ValueError(f"{name}: expected a square matrix {want}, got shape {tuple(a.shape)}")
    if a.shape[-1] != N:
        raise ValueError(f"{name}: expected N = {N} nodes (x.shape[-2]), got {a.shape[-1]}")


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """x as (S, N, F). Already 3-D: x itself, since a reshape to the same shape still records
    a view node that costs about 14 us of autograd work per call (forward and backward)."""
    if x.dim() == 3:
        return x
    N, F = x.shape[-2], x.shape[-1]
    return x.reshape(math.prod(x.shape[:-2]), N, F)


def _unflatten(t: torch.Tensor, lead: tuple, *tail: int) -> torch.Tensor:
    """t (S, ...) back to (*lead, *tail); t itself when lead is S already (see _flatten)."""
    return t if len(lead) == 1 else t.reshape(*lead, *tail)


def _flat_scores(scores: Optional[torch.Tensor], lead: tuple, N: int) -> Optional[torch.Tensor]:
    if scores is None or len(lead) == 1:
        return scores
    return scores.reshape(math.prod(lead), N)


def _check_conv_args(x, adjacency, weight, bias) -> int:
    """Validate graph_conv's arguments; returns the number of output features."""
    _check_nodes(x)
    N, F = x.shape[-2], x.shape[-1]
    _check_like_x("adjacency", adjacency, x)
    _check_square("adjacency", adjacency, N, allow_batch=True)
    if adjacency.dim() == 3:
        if x.dim() < 3:
            raise ValueError(f"adjacency: a batch of graphs (B, N, N) needs x with a batch dimension "
                             f"(B, ..., N, F), got x of shape {tuple(x.shape)}")
        if adjacency.shape[0] != x.shape[0]:
            raise ValueError(f"adjacency: expected B = {x.shape[0]} graphs (x.shape[0]), got {adjacency.shape[0]}")
    Fo = F
    if weight is not None:
        _check_like_x("weight", weight, x)
        if weight.dim() != 2 or weight.shape[0] != F:
            raise ValueError(f"weight: expected shape (F, F_out) with F = {F} (x.shape[-1]), got {tuple(weight.shape)}")
        Fo = weight.shape[1]
    if bias is not None:
        _check_like_x("bias", bias, x)
        if bias.dim() != 1 or bias.shape[0] != Fo:
            raise ValueError(f"bias: expected shape ({Fo},) (the output features), got {tuple(bias.shape)}")
    return Fo


def _check_assignment(x, assignment, scores, num_parents) -> int:
    """Validate pooling arguments; returns the number of parents P."""
    N = x.shape[-2]
    check_tensor("assignment", assignment, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device("assignment", assignment, "x", x)
    if assignment.shape[0] != N:
        raise ValueError(f"assignment: expected one parent per node, N = {N} entries (x.shape[-2]), "
                         f"got {assignment.shape[0]}")
    if scores is not None:
        _check_like_x("scores", scores, x)
        if tuple(scores.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"scores: expected shape {tuple(x.shape[:-1])} (x.shape[:-1]), got {tuple(scores.shape)}")
    if num_parents is None:
        # Reads the data: pass num_parents explicitly under torch.compile.
        return int(assignment.max()) + 1 if assignment.numel() else 0
    if not isinstance(num_parents, (int, torch.SymInt)) or isinstance(num_parents, bool):
        raise TypeError(f"num_parents: expected an int, got {type(num_parents).__name__}")
    if num_parents < 0:
        raise ValueError(f"num_parents: expected a count >= 0, got {num_parents}")
    return num_parents


def _prepare_assignment(assignment: torch.Tensor, P: int, adjacency: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64, contiguous; on CUDA the values are checked here (the CPU core checks its own),
    and the adjacency's finite check, if it is due, is read back with them."""
    assignment = assignment.to(torch.int64).contiguous()
    if assignment.is_cuda and checks_values(assignment):
        pending = None if adjacency is None else pending_finite_check(adjacency)
        extra = _check_assignment_values(assignment, P, [] if pending is None else [pending])
        if pending is not None:
            finish_finite_check("adjacency", adjacency, extra[0])
    return assignment


def _check_assignment_values(assignment: torch.Tensor, P: int, extra: list = ()) -> list:
    """Parent indices in [0, P) and every parent with a child, read back once (on CUDA each read
    back waits for the GPU) together with the int64 scalars in `extra`, whose values it returns.
    The emptiest parent is counted over clamped indices, which differ only when the range check
    fails first."""
    N = assignment.shape[0]
    stats = list(torch.aminmax(assignment)) if N else []
    # Not torch.bincount: on CUDA it reads its input's min and max back (two more waits).
    counts = None
    if P:
        clamped = assignment.clamp(0, P - 1)
        counts = torch.zeros(P, dtype=torch.int64, device=assignment.device).scatter_add_(
            0, clamped, torch.ones_like(clamped))
    if P:
        stats.append(counts.min())
    read = torch.stack(stats + list(extra)).tolist() if stats or extra else []
    values, extra_values = read[:len(stats)], read[len(stats):]
    if N:
        lo, hi = values[:2]
        if lo < 0 or hi >= P:
            raise ValueError(f"assignment: expected parent indices in [0, {P - 1}], got {lo if lo < 0 else hi}")
    if P and values[-1] == 0:
        empty = int(torch.nonzero(counts == 0)[0])
        raise ValueError(f"assignment: expected every parent in [0, {P - 1}] to have at least one child, "
                         f"got none for parent {empty}")
    return extra_values


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def graph_conv(
    x: torch.Tensor,
    adjacency: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """``act(A @ x @ weight + bias)`` for every sample, in one pass.

    Args:
        x: (..., N, F) node features (float32/float64 on CPU; also float16/bfloat16 on CUDA).
        adjacency: (N, N) shared by every sample, or (B, N, N) with B == x.shape[0], one graph
            per leading index (the dimensions between the first and N share it). Must be
            finite (checked; on CUDA once per tensor version, a host wait, and not while a
            CUDA graph is captured). Normalise it beforehand (see ``affectkit.eeg``).
        weight: optional (F, F_out); without it F_out == F (HiSTN filters without weights).
        bias: optional (F_out,).
        activation: None, "relu", "elu", "leaky_relu" (slope 0.01), "tanh" or "sigmoid".

    Returns:
        (..., N, F_out). Differentiable in x, adjacency, weight and bias.
    """
    _check_conv_args(x, adjacency, weight, bias)
    code = _activation_code(activation)
    lead = x.shape[:-2]
    adj3 = adjacency if adjacency.dim() == 3 else adjacency.unsqueeze(0)
    out = call_direct_or_op(_graph_conv.plain, torch.ops.affectkit.graph_conv,
                            _flatten(x), adj3, weight, bias, code, function=_graph_conv.function)
    return _unflatten(out, lead, x.shape[-2], out.shape[-1])


def hierarchical_pool(
    x: torch.Tensor,
    assignment: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    num_parents: Optional[int] = None,
) -> torch.Tensor:
    """Pool child nodes into their parents: mean, or a softmax over the children of scores.

    Args:
        x: (..., N, F) child-node features.
        assignment: (N,) int32/int64 parent index of every child, in [0, P); every parent
            must have at least one child.
        scores: optional (..., N) attention logits (HiSTN's region attention); each parent
            weights its children by the softmax of their scores. Without scores: the mean.
        num_parents: P. Default ``assignment.max() + 1`` (reads the data; pass it explicitly
            under torch.compile).

    Returns:
        (..., P, F).
    """
    _check_nodes(x)
    P = _check_assignment(x, assignment, scores, num_parents)
    lead = x.shape[:-2]
    s2 = _flat_scores(scores, lead, x.shape[-2])
    out = call_direct_or_op(_hierarchical_pool.plain, torch.ops.affectkit.hierarchical_pool,
                            _flatten(x), assignment, s2, P, function=_hierarchical_pool.function)
    return _unflatten(out, lead, P, x.shape[-1])


def graph_conv_pool(
    x: torch.Tensor,
    adjacency: torch.Tensor,
    assignment: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    scores: Optional[torch.Tensor] = None,
    num_parents: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hierarchy level in one pass: ``graph_conv`` then ``hierarchical_pool`` of its output.

    Returns ``(node_out, pooled_out)``: (..., N, F_out) and (..., P, F_out); hierarchical
    models keep both (they concatenate every level). Arguments as in ``graph_conv`` and
    ``hierarchical_pool``.
    """
    _check_conv_args(x, adjacency, weight, bias)
    code = _activation_code(activation)
    P = _check_assignment(x, assignment, scores, num_parents)
    lead, N = x.shape[:-2], x.shape[-2]
    adj3 = adjacency if adjacency.dim() == 3 else adjacency.unsqueeze(0)
    s2 = _flat_scores(scores, lead, N)
    node, pooled = call_direct_or_op(_graph_conv_pool.plain, torch.ops.affectkit.graph_conv_pool,
                                      _flatten(x), adj3, weight, bias, code, assignment, s2, P,
                                      function=_graph_conv_pool.function)
    Fo = node.shape[-1]
    return _unflatten(node, lead, N, Fo), _unflatten(pooled, lead, P, Fo)


def cheb_graph_conv(x: torch.Tensor, laplacian: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Chebyshev graph filter ``sum_k T_k(L) x theta_k`` (ChebNet; HiSTN's region filters).

    Args:
        x: (..., N, F) node features.
        laplacian: (N, N) shared by every sample, usually the rescaled Laplacian
            ``2 L / lambda_max - I`` (``affectkit.eeg.rescaled_laplacian``); must be finite.
        coefficients: (K,) scalars theta_k (output F features), or (K, F, F_out) matrices.
            K >= 1 terms: T_0 = I, T_1 = L, T_k = 2 L T_{k-1} - T_{k-2}.

    Returns:
        (..., N, F_out). Differentiable in x, laplacian and coefficients.
    """
    _check_nodes(x)
    N, F = x.shape[-2], x.shape[-1]
    _check_like_x("laplacian", laplacian, x)
    _check_square("laplacian", laplacian, N, allow_batch=False)
    _check_like_x("coefficients", coefficients, x)
    if coefficients.dim() == 1:
        ok = coefficients.shape[0] >= 1
    elif coefficients.dim() == 3:
        ok = coefficients.shape[0] >= 1 and coefficients.shape[1] == F
    else:
        ok = False
    if not ok:
        raise ValueError(f"coefficients: expected shape (K,) or (K, F, F_out) with K >= 1 and F = {F} "
                         f"(x.shape[-1]), got {tuple(coefficients.shape)}")
    lead = x.shape[:-2]
    out = call_direct_or_op(_cheb_graph_conv.plain, torch.ops.affectkit.cheb_graph_conv,
                            _flatten(x), laplacian, coefficients, function=_cheb_graph_conv.function)
    return _unflatten(out, lead, N, out.shape[-1])


# --------------------------------------------------------------------------------------
# graph_conv: op, fake, backward op, autograd
# --------------------------------------------------------------------------------------


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _optptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else ptr(t)


# On CUDA the backward passes run as PyTorch matrix products (float32 accumulation for
# 16-bit inputs); only the forward passes have CUDA kernels of their own.


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _activation_slope(y: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == 1:
        return (y > 0).to(y.dtype)
    if activation == 2:
        return torch.where(y > 0, torch.ones_like(y), y + 1)
    if activation == 3:
        return torch.where(y > 0, torch.ones_like(y), torch.full_like(y, 0.01))
    if activation == 4:
        return 1 - y * y
    if activation == 5:
        return y * (1 - y)
    return torch.ones_like(y)


_ACTIVATION_FNS = {0: lambda y: y, 1: torch.relu, 2: torch.nn.functional.elu,
                   3: lambda y: torch.nn.functional.leaky_relu(y, 0.01), 4: torch.tanh, 5: torch.sigmoid}


def _empty_weight(weight: Optional[torch.Tensor]) -> bool:
    """A weight with no elements ((F, 0) or (0, F_out)): the core reads a null pointer as "no
    weight", so these go through PyTorch (there is nothing to compute but the bias)."""
    return weight is not None and weight.numel() == 0


def _conv_forward_torch(x, adjacency, weight, bias, activation):
    S, N, F = x.shape
    B = adjacency.shape[0]
    y = (adjacency.unsqueeze(1) @ x.reshape(B, S // B, N, F)).reshape(S, N, F) @ weight
    return _ACTIVATION_FNS[activation](y if bias is None else y + bias)


def _conv_backward_torch(grad_out, out, x, adjacency, weight, activation, need_x, need_adjacency, need_weight,
                         need_bias):
    acc = _acc_dtype(x)
    S, N, F = x.shape
    B, Fo = adjacency.shape[0], out.shape[2]
    need_weight = need_weight and weight is not None
    g = (grad_out.to(acc) * _activation_slope(out.to(acc), activation)).reshape(B, S // B, N, Fo)
    X = x.to(acc).reshape(B, S // B, N, F)
    A = adjacency.to(acc)
    H = g if weight is None else g @ weight.to(acc).T  # gradient with respect to A x
    gx = (A.transpose(1, 2).unsqueeze(1) @ H).reshape(S, N, F).to(x.dtype) if need_x else _empty(x)
    ga = (H @ X.transpose(2, 3)).sum(1).to(adjacency.dtype) if need_adjacency else _empty(x)
    gw = ((A.unsqueeze(1) @ X).reshape(S * N, F).T @ g.reshape(S * N, Fo)).to(weight.dtype) if need_weight else _empty(x)
    gb = g.sum((0, 1, 2)).to(x.dtype) if need_bias else _empty(x)
    return gx, ga, gw, gb


def _cheb_backward_torch(grad_out, x, laplacian, coefficients, need_x, need_laplacian, need_coefficients):
    """Reverse mode through the recurrence t_0 = X, t_1 = L X, t_k = 2 L t_{k-1} - t_{k-2},
    y = sum_k t_k theta_k, written out (it runs inside the op, below autograd, where
    torch.autograd cannot record: under torch.compile it must not rely on it)."""
    acc = _acc_dtype(x)
    X, L, C, G = (t.to(acc) for t in (x, laplacian, coefficients, grad_out))
    K = C.shape[0]
    terms = [X] + ([L @ X] if K > 1 else [])
    for _ in range(2, K):
        terms.append(2 * (L @ terms[-1]) - terms[-2])
    if C.dim() == 1:
        gc = torch.stack([(G * t).sum() for t in terms])
        adj = [C[k] * G for k in range(K)]  # adjoint of each t_k from y directly
    else:
        gc = torch.stack([t.reshape(-1, t.shape[-1]).T @ G.reshape(-1, G.shape[-1]) for t in terms])
        adj = [G @ C[k].T for k in range(K)]
    gl = torch.zeros_like(L)
    Lt = L.T
    for k in range(K - 1, 1, -1):  # t_k = 2 L t_{k-1} - t_{k-2}
        adj[k - 1] = adj[k - 1] + 2 * (Lt @ adj[k])
        adj[k - 2] = adj[k - 2] - adj[k]
        gl = gl + 2 * (adj[k] @ terms[k - 1].transpose(-1, -2)).sum(0)
    if K > 1:  # t_1 = L t_0
        adj[0] = adj[0] + Lt @ adj[1]
        gl = gl + (adj[1] @ terms[0].transpose(-1, -2)).sum(0)
    grads = (adj[0], gl, gc)
    wanted = (need_x, need_laplacian, need_coefficients)
    return tuple(gr.to(t.dtype) if w else _empty(x) for gr, t, w in zip(grads, (x, laplacian, coefficients), wanted))


@affectkit_op("affectkit::graph_conv")
def _graph_conv(
    x: torch.Tensor, adjacency: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: int
) -> torch.Tensor:
    x, adjacency, weight, bias = x.contiguous(), adjacency.contiguous(), _contig(weight), _contig(bias)
    check_finite_graph("adjacency", adjacency)
    if _empty_weight(weight):
        return _conv_forward_torch(x, adjacency, weight, bias, activation)
    S, N, F = x.shape
    Fo = F if weight is None else weight.shape[1]
    out = x.new_empty((S, N, Fo))
    _C.graph_conv_forward(
        device_code(x), dtype_code(x), ptr(x), ptr(adjacency), _optptr(weight), _optptr(bias), ptr(out),
        S, N, F, Fo, adjacency.shape[0], activation, stream_handle(x),
    )
    return out


@_graph_conv.register_fake
def _(x, adjacency, weight, bias, activation):
    Fo = x.shape[2] if weight is None else weight.shape[1]
    return x.new_empty((x.shape[0], x.shape[1], Fo))


@affectkit_op("affectkit::graph_conv_backward")
def _graph_conv_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    adjacency: torch.Tensor,
    weight: Optional[torch.Tensor],
    activation: int,
    need_x: bool,
    need_adjacency: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.is_cuda or _empty_weight(weight):
        return _conv_backward_torch(grad_out, out, x, adjacency, weight, activation,
                                    need_x, need_adjacency, need_weight, need_bias)
    # grad_out is read through its strides: sum()'s gradient, a mean over nodes' or a slice's
    # arrives broadcast or strided, and copying it would cost a full pass (3.7 MB at 2,048 x 14 x 32).
    # The kernel trusts its shape and dtype: check them (autograd guarantees both, direct callers not).
    if grad_out.dtype != out.dtype:
        raise TypeError(f"grad_out: expected dtype {out.dtype} (the output's), got {grad_out.dtype}")
    if grad_out.shape != out.shape:
        raise ValueError(f"grad_out: expected shape {tuple(out.shape)} (the output's), got {tuple(grad_out.shape)}")
    out, x, adjacency, weight = out.contiguous(), x.contiguous(), adjacency.contiguous(), _contig(weight)
    S, N, F = x.shape
    Fo = out.shape[2]
    need_weight = need_weight and weight is not None
    gx = x.new_empty((S, N, F)) if need_x else _empty(x)
    ga = adjacency.new_empty(adjacency.shape) if need_adjacency else _empty(x)
    gw = weight.new_empty(weight.shape) if need_weight else _empty(x)
    gb = x.new_empty((Fo,)) if need_bias else _empty(x)
    _C.graph_conv_backward(
        device_code(x), dtype_code(x), ptr(grad_out), ptr(out), ptr(x), ptr(adjacency), _optptr(weight),
        ptr(gx) if need_x else 0, ptr(ga) if need_adjacency else 0, ptr(gw) if need_weight else 0,
        ptr(gb) if need_bias else 0, S, N, F, Fo, adjacency.shape[0], activation, stream_handle(x),
        None if grad_out.is_contiguous() else grad_out.stride(),
    )
    return gx, ga, gw, gb


@_graph_conv_backward.register_fake
def _(grad_out, out, x, adjacency, weight, activation, need_x, need_adjacency, need_weight, need_bias):
    need_weight = need_weight and weight is not None
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        adjacency.new_empty(adjacency.shape) if need_adjacency else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_weight else x.new_empty((0,)),
        x.new_empty((out.shape[2],)) if need_bias else x.new_empty((0,)),
    )


def _conv_grads(ctx, grad_out, out, x, adjacency, weight, has_bias, activation):
    """(grad_x, grad_adjacency, grad_weight, grad_bias), None where not needed."""
    nx, na, nw, nb = ctx.needs_input_grad[:4]
    gx, ga, gw, gb = call_direct_or_op(
        _graph_conv_backward.plain, torch.ops.affectkit.graph_conv_backward,
        grad_out, out, x, adjacency, weight, activation, nx, na, nw and weight is not None, nb and has_bias)
    return (gx if nx else None, ga if na else None, gw if nw and weight is not None else None,
            gb if nb and has_bias else None)


def _conv_setup_context(ctx, inputs, output):
    x, adjacency, weight, bias, activation = inputs
    ctx.save_for_backward(x, adjacency, weight, output)
    ctx.has_bias = bias is not None
    ctx.activation = activation


def _conv_backward(ctx, grad_out):
    x, adjacency, weight, out = ctx.saved_tensors
    grads = _conv_grads(ctx, grad_out, out, x, adjacency, weight, ctx.has_bias, ctx.activation)
    return (*grads, None)


register_autograd(_graph_conv, _conv_backward, _conv_setup_context)


# --------------------------------------------------------------------------------------
# hierarchical_pool: op, fake, backward op, autograd
# --------------------------------------------------------------------------------------


@affectkit_op("affectkit::hierarchical_pool")
def _hierarchical_pool(
    x: torch.Tensor, assignment: torch.Tensor, scores: Optional[torch.Tensor], num_parents: int
) -> torch.Tensor:
    x, scores = x.contiguous(), _contig(scores)
    S, N, F = x.shape
    assignment = _prepare_assignment(assignment, num_parents)
    out = x.new_empty((S, num_parents, F))
    _C.hierarchical_pool_forward(
        device_code(x), dtype_code(x), ptr(x), ptr(assignment), _optptr(scores), ptr(out),
        S, N, F, num_parents, stream_handle(x),
    )
    return out


@_hierarchical_pool.register_fake
def _(x, assignment, scores, num_parents):
    return x.new_empty((x.shape[0], num_parents, x.shape[2]))


@affectkit_op("affectkit::hierarchical_pool_backward")
def _hierarchical_pool_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    assignment: torch.Tensor,
    scores: Optional[torch.Tensor],
    need_x: bool,
    need_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out, x, scores = grad_out.contiguous(), x.contiguous(), _contig(scores)
    S, N, F = x.shape
    P = grad_out.shape[1]
    need_scores = need_scores and scores is not None
    assignment = _prepare_assignment(assignment, P)
    gx = x.new_empty((S, N, F)) if need_x else _empty(x)
    gs = x.new_empty((S, N)) if need_scores else _empty(x)
    _C.hierarchical_pool_backward(
        device_code(x), dtype_code(x), ptr(grad_out), ptr(x), ptr(assignment), _optptr(scores),
        ptr(gx) if need_x else 0, ptr(gs) if need_scores else 0, S, N, F, P, stream_handle(x),
    )
    return gx, gs


@_hierarchical_pool_backward.register_fake
def _(grad_out, x, assignment, scores, need_x, need_scores):
    need_scores = need_scores and scores is not None
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        x.new_empty((x.shape[0], x.shape[1])) if need_scores else x.new_empty((0,)),
    )


def _pool_setup_context(ctx, inputs, output):
    x, assignment, scores, num_parents = inputs
    ctx.save_for_backward(x, assignment, scores)


def _pool_backward(ctx, grad_out):
    x, assignment, scores = ctx.saved_tensors
    need_x, _, need_scores = ctx.needs_input_grad[:3]
    need_scores = need_scores and scores is not None
    gx, gs = call_direct_or_op(_hierarchical_pool_backward.plain, torch.ops.affectkit.hierarchical_pool_backward,
                               grad_out, x, assignment, scores, need_x, need_scores)
    return gx if need_x else None, None, gs if need_scores else None, None


register_autograd(_hierarchical_pool, _pool_backward, _pool_setup_context)


# --------------------------------------------------------------------------------------
# graph_conv_pool (fused level): op, fake, autograd through the two backward ops
# --------------------------------------------------------------------------------------


@affectkit_op("affectkit::graph_conv_pool")
def _graph_conv_pool(
    x: torch.Tensor,
    adjacency: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    activation: int,
    assignment: torch.Tensor,
    scores: Optional[torch.Tensor],
    num_parents: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    x, adjacency, weight, bias, scores = (
        x.contiguous(), adjacency.contiguous(), _contig(weight), _contig(bias), _contig(scores))
    S, N, F = x.shape
    Fo = F if weight is None else weight.shape[1]
    assignment = _prepare_assignment(assignment, num_parents, adjacency)
    if _empty_weight(weight):
        node = _conv_forward_torch(x, adjacency, weight, bias, activation)
        return node, _hierarchical_pool.plain(node, assignment, scores, num_parents)
    node = x.new_empty((S, N, Fo))
    pooled = x.new_empty((S, num_parents, Fo))
    _C.graph_conv_pool_forward(
        device_code(x), dtype_code(x), ptr(x), ptr(adjacency), _optptr(weight), _optptr(bias),
        ptr(assignment), _optptr(scores), ptr(node), ptr(pooled), S, N, F, Fo, adjacency.shape[0],
        num_parents, activation, stream_handle(x),
    )
    return node, pooled


@_graph_conv_pool.register_fake
def _(x, adjacency, weight, bias, activation, assignment, scores, num_parents):
    Fo = x.shape[2] if weight is None else weight.shape[1]
    return x.new_empty((x.shape[0], x.shape[1], Fo)), x.new_empty((x.shape[0], num_parents, Fo))


def _level_setup_context(ctx, inputs, output):
    x, adjacency, weight, bias, activation, assignment, scores, num_parents = inputs
    node, _ = output
    ctx.save_for_backward(x, adjacency, weight, node, assignment, scores)
    ctx.has_bias = bias is not None
    ctx.activation = activation


def _level_backward(ctx, grad_node, grad_pooled):
    x, adjacency, weight, node, assignment, scores = ctx.saved_tensors
    need_scores = ctx.needs_input_grad[6] and scores is not None
    # The pooled output feeds back into the node output's gradient (and the scores').
    g_node, g_scores = call_direct_or_op(
        _hierarchical_pool_backward.plain, torch.ops.affectkit.hierarchical_pool_backward,
        grad_pooled, node, assignment, scores, True, need_scores)
    if grad_node is not None:
        g_node = g_node + grad_node
    gx, ga, gw, gb = _conv_grads(ctx, g_node, node, x, adjacency, weight, ctx.has_bias, ctx.activation)
    return gx, ga, gw, gb, None, None, g_scores if need_scores else None, None


register_autograd(_graph_conv_pool, _level_backward, _level_setup_context)


# --------------------------------------------------------------------------------------
# cheb_graph_conv: op, fake, backward op, autograd
# --------------------------------------------------------------------------------------


def _cheb_out_features(x: torch.Tensor, coefficients: torch.Tensor) -> int:
    return coefficients.shape[2] if coefficients.dim() == 3 else x.shape[2]


@affectkit_op("affectkit::cheb_graph_conv")
def _cheb_graph_conv(x: torch.Tensor, laplacian: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    x, laplacian, coefficients = x.contiguous(), laplacian.contiguous(), coefficients.contiguous()
    check_finite_graph("laplacian", laplacian)
    S, N, F = x.shape
    Fo = _cheb_out_features(x, coefficients)
    out = x.new_empty((S, N, Fo))
    _C.cheb_graph_conv_forward(
        device_code(x), dtype_code(x), ptr(x), ptr(laplacian), ptr(coefficients), ptr(out),
        S, N, F, Fo, coefficients.shape[0], coefficients.dim() == 3, stream_handle(x),
    )
    return out


@_cheb_graph_conv.register_fake
def _(x, laplacian, coefficients):
    return x.new_empty((x.shape[0], x.shape[1], _cheb_out_features(x, coefficients)))


@affectkit_op("affectkit::cheb_graph_conv_backward")
def _cheb_graph_conv_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    laplacian: torch.Tensor,
    coefficients: torch.Tensor,
    need_x: bool,
    need_laplacian: bool,
    need_coefficients: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return _cheb_backward_torch(grad_out, x, laplacian, coefficients, need_x, need_laplacian, need_coefficients)
    grad_out, x, laplacian, coefficients = (
        grad_out.contiguous(), x.contiguous(), laplacian.contiguous(), coefficients.contiguous())
    S, N, F = x.shape
    Fo = grad_out.shape[2]
    gx = x.new_empty((S, N, F)) if need_x else _empty(x)
    gl = laplacian.new_empty(laplacian.shape) if need_laplacian else _empty(x)
    gc = coefficients.new_empty(coefficients.shape) if need_coefficients else _empty(x)
    _C.cheb_graph_conv_backward(
        device_code(x), dtype_code(x), ptr(grad_out), ptr(x), ptr(laplacian), ptr(coefficients),
        ptr(gx) if need_x else 0, ptr(gl) if need_laplacian else 0, ptr(gc) if need_coefficients else 0,
        S, N, F, Fo, coefficients.shape[0], coefficients.dim() == 3, stream_handle(x),
    )
    return gx, gl, gc


@_cheb_graph_conv_backward.register_fake
def _(grad_out, x, laplacian, coefficients, need_x, need_laplacian, need_coefficients):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        laplacian.new_empty(laplacian.shape) if need_laplacian else x.new_empty((0,)),
        coefficients.new_empty(coefficients.shape) if need_coefficients else x.new_empty((0,)),
    )


def _cheb_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _cheb_backward(ctx, grad_out):
    x, laplacian, coefficients = ctx.saved_tensors
    nx, nl, nc = ctx.needs_input_grad[:3]
    gx, gl, gc = call_direct_or_op(_cheb_graph_conv_backward.plain, torch.ops.affectkit.cheb_graph_conv_backward,
                                   grad_out, x, laplacian, coefficients, nx, nl, nc)
    return gx if nx else None, gl if nl else None, gc if nc else None


register_autograd(_cheb_graph_conv, _cheb_backward, _cheb_setup_context)
