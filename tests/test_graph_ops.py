"""affectkit.ops graph family: graph_conv, cheb_graph_conv, hierarchical_pool, graph_conv_pool."""

import itertools

import pytest
import torch
import torch.nn.functional as Fn

import affectkit.ops as ops
from affectkit.selfcheck import rel_error

from _support import cuda_synchronisations, requires_cuda

ACTS = [None, "relu", "elu", "leaky_relu", "tanh", "sigmoid"]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------------
# float64 references: plain PyTorch matrix products
# ----------------------------------------------------------------------------------------


def act_ref(y, act):
    return {None: lambda t: t, "relu": torch.relu, "elu": Fn.elu, "leaky_relu": Fn.leaky_relu,
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](y)


def act_on_kernels_side(z, act, out):
    """act_ref(z, act), taking relu's and leaky_relu's branch from the float32 kernel's output
    (out > 0) rather than from z: a pre-activation within rounding of 0 can have the other sign
    in float64 (z = -8.3e-8 where float32 gave +2.1e-8, one element of 7,680), and the
    derivative jumps there, by far more than any tolerance. The other activations have
    continuous derivatives."""
    if act in ("relu", "leaky_relu"):
        return torch.where((out > 0).reshape(z.shape), z, z * (0.0 if act == "relu" else 0.01))
    return act_ref(z, act)


def conv_ref(x, A, W=None, b=None, act=None):
    x, A = x.double(), A.double()
    if A.dim() == 2:
        y = A @ x
    else:  # one graph per leading index, shared by the dimensions in between
        Ab = A.reshape(A.shape[0], *([1] * (x.dim() - 3)), *A.shape[1:])
        y = Ab @ x
    if W is not None:
        y = y @ W.double()
    if b is not None:
        y = y + b.double()
    return act_ref(y, act)


def cheb_ref(x, L, coef):
    x, L, coef = x.double(), L.double(), coef.double()
    terms = [x]
    if coef.shape[0] > 1:
        terms.append(L @ x)
    for _ in range(2, coef.shape[0]):
        terms.append(2 * (L @ terms[-1]) - terms[-2])
    if coef.dim() == 1:
        return sum(c * t for c, t in zip(coef, terms))
    return sum(t @ c for c, t in zip(coef, terms))


def pool_weights_ref(assignment, scores, P, lead, N, dtype=torch.float64):
    member = torch.nn.functional.one_hot(assignment.long(), P).T.bool()  # (P, N)
    if scores is None:
        w = member.to(dtype) / member.sum(1, keepdim=True).to(dtype)
        return w.expand(*lead, P, N)
    s = scores.double().unsqueeze(-2).expand(*lead, P, N)
    return torch.softmax(s.masked_fill(~member, float("-inf")), dim=-1)


def pool_ref(x, assignment, scores=None, P=None):
    P = int(assignment.max()) + 1 if P is None else P
    w = pool_weights_ref(assignment, scores, P, x.shape[:-2], x.shape[-2])
    return w @ x.double()


def random_assignment(N, P, gen):
    """Every parent gets at least one child, the rest at random, in shuffled order."""
    a = torch.cat([torch.arange(P), torch.randint(0, P, (N - P,), generator=gen)])
    return a[torch.randperm(N, generator=gen)]


def rand(*shape, gen, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------
# graph_conv forward
# ----------------------------------------------------------------------------------------

NODES = [1, 14, 32, 62, 200]
FEATURES = [(1, 1), (5, 32), (64, 64), (7, 3), (13, 1)]


@pytest.mark.parametrize("N", NODES)
@pytest.mark.parametrize("F, Fo", FEATURES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_conv_matches_reference(N, F, Fo, per_sample, dtype, gen):
    B, T = 3, 2 if N <= 62 else 1
    act = ACTS[(N + F + Fo) % len(ACTS)]
    x = rand(B, T, N, F, gen=gen, dtype=dtype)
    A = rand(*((B,) if per_sample else ()), N, N, gen=gen, dtype=dtype) / N**0.5
    W, b = rand(F, Fo, gen=gen, dtype=dtype), rand(Fo, gen=gen, dtype=dtype)
    got = ops.graph_conv(x, A, W, b, act)
    assert got.shape == (B, T, N, Fo) and got.dtype == dtype
    assert rel_error(got, conv_ref(x, A, W, b, act)) <= TOL[dtype]


@pytest.mark.parametrize("N", [1, 13, 16, 17, 33, 64, 65])
@pytest.mark.parametrize("F, Fo", [(1, 1), (5, 32), (16, 17), (3, 40), (9, 16)])
@pytest.mark.parametrize("act", ACTS)
def test_graph_conv_float32_small_features_every_activation(N, F, Fo, act, gen):
    # float32 with W, N <= 64 and F <= 16 takes the transposed-tile forward on AVX-512
    # machines (none, relu and leaky_relu with the epilogue fused; N = 65 and F > 16 take the
    # general one). The output is poisoned before the call; every other case drops the bias
    # or uses per-sample graphs.
    import affectkit._C as C

    S, B = 6, 1 if (N + Fo) % 2 else 3
    x, A = rand(S, N, F, gen=gen, dtype=torch.float32), rand(B, N, N, gen=gen, dtype=torch.float32) / N**0.5
    W = rand(F, Fo, gen=gen, dtype=torch.float32)
    b = rand(Fo, gen=gen, dtype=torch.float32) if (N + F) % 2 else None
    out = torch.full((S, N, Fo), float("nan"))
    C.graph_conv_forward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(x), _c(A), _c(W), _c(b) if b is not None else 0,
                         _c(out), S, N, F, Fo, B, ops.graph.ACTIVATIONS[act])
    want = conv_ref(x.reshape(B, S // B, N, F), A, W, b, act).reshape(S, N, Fo)
    # Float32 rounding is bounded by the sums of |terms|, not by the result: with F = 1 and relu
    # a sum over 16 nodes can cancel to ~1e-4 while the other outputs clip to 0 (a CI run saw
    # 3.8e-5 relative to the result that way). Measure against |A| |x| |W| + |b|.
    scale = conv_ref(x.abs().reshape(B, S // B, N, F), A.abs(), W.abs(), None if b is None else b.abs()).reshape(S, N, Fo)

    def error(got, ref, ref_scale):
        return torch.linalg.vector_norm(got.double() - ref).item() / torch.linalg.vector_norm(ref_scale).item()

    assert error(out, want, scale) <= 2e-5
    if N > 1 and B == 1:  # the fused level: pooling reads the outputs the fused epilogue wrote
        assignment = random_assignment(N, 2, gen)
        node, pooled = ops.graph_conv_pool(x, A[0], assignment, W, b, act, None, 2)
        assert error(node, want, scale) <= 2e-5
        assert error(pooled, pool_ref(want, assignment, None, 2), pool_ref(scale, assignment, None, 2)) <= 2e-5


@pytest.mark.parametrize("N", [62, 65])
@pytest.mark.parametrize("F, Fo", [(64, 64), (20, 48), (24, 16), (17, 8)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_conv_general_path_matches_reference_every_activation(N, F, Fo, act, dtype, gen):
    # More than 16 input features: the general forward, whose last product applies the bias and
    # a piecewise-linear activation as it stores whole vectors into the output (where Fo fills
    # them: F <= Fo multiplies by W last, F > Fo by A last). Output poisoned before the call.
    import affectkit._C as C

    S, B = 4, 1 if (N + F) % 2 else 2
    x, A = rand(S, N, F, gen=gen, dtype=dtype), rand(B, N, N, gen=gen, dtype=dtype) / N**0.5
    W = rand(F, Fo, gen=gen, dtype=dtype) / F**0.5
    b = rand(Fo, gen=gen, dtype=dtype) if (Fo + (act is None)) % 2 == 0 else None
    out = torch.full((S, N, Fo), float("nan"), dtype=dtype)
    C.graph_conv_forward(C.DEVICE_CPU, C.DTYPE_CODES[str(dtype).split(".")[1]], _c(x), _c(A), _c(W),
                         _c(b) if b is not None else 0, _c(out), S, N, F, Fo, B, ops.graph.ACTIVATIONS[act])
    want = conv_ref(x.reshape(B, S // B, N, F), A, W, b, act).reshape(S, N, Fo)
    assert rel_error(out, want) <= TOL[dtype]


@pytest.mark.parametrize("N, F, Fo", [(14, 5, 32), (7, 3, 13), (65, 5, 32), (62, 64, 64)])
@pytest.mark.parametrize("act", ACTS)
def test_graph_conv_propagates_nan_and_inf_like_the_composite(N, F, Fo, act, gen):
    # A NaN or infinite feature spreads through A x W into whole rows; every path, the fused
    # tile epilogues included, must keep what the composite keeps (relu(NaN) is NaN, not 0).
    S = 4
    x = rand(S, N, F, gen=gen, dtype=torch.float32)
    A = rand(N, N, gen=gen, dtype=torch.float32) / N**0.5
    W, b = rand(F, Fo, gen=gen, dtype=torch.float32), rand(Fo, gen=gen, dtype=torch.float32)
    x[1, N // 2, 0] = float("nan")
    x[2, 0, F - 1] = float("inf")
    got = ops.graph_conv(x, A, W, b, act)
    want = conv_ref(x, A, W, b, act)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("F", [1, 5, 16, 17])
def test_graph_conv_without_weight_or_bias(act, F, gen):
    x, A = rand(11, 14, F, gen=gen, dtype=torch.float32), rand(14, 14, gen=gen, dtype=torch.float32)
    assert rel_error(ops.graph_conv(x, A, activation=act), conv_ref(x, A, act=act)) <= 2e-5
    b = rand(F, gen=gen, dtype=torch.float32)
    assert rel_error(ops.graph_conv(x, A, bias=b, activation=act), conv_ref(x, A, b=b, act=act)) <= 2e-5


def test_graph_conv_leading_dims_and_non_contiguous(gen):
    # 2-D x (one graph), 4-D x with per-sample graphs, and transposed views everywhere.
    x2, A = rand(14, 5, gen=gen), rand(14, 14, gen=gen)
    assert rel_error(ops.graph_conv(x2, A), A @ x2) <= 1e-12
    base = rand(7, 3, 5, 14, gen=gen)
    x = base.transpose(-1, -2)  # (7, 3, 14, 5) view
    Ab = rand(7, 14, 14, gen=gen).transpose(-1, -2)
    W = rand(32, 5, gen=gen).T
    assert not x.is_contiguous() and not W.is_contiguous()
    assert rel_error(ops.graph_conv(x, Ab, W, None, "elu"), conv_ref(x, Ab, W, None, "elu")) <= 1e-12


def test_graph_conv_empty_batch_and_zero_features(gen):
    A, W = rand(14, 14, gen=gen, requires_grad=True), rand(5, 8, gen=gen, requires_grad=True)
    x = rand(0, 14, 5, gen=gen, requires_grad=True)
    y = ops.graph_conv(x, A, W, None, "relu")
    assert y.shape == (0, 14, 8)
    y.sum().backward()
    assert (A.grad == 0).all() and (W.grad == 0).all()
    x0 = rand(4, 14, 0, gen=gen)
    assert ops.graph_conv(x0, A.detach()).shape == (4, 14, 0)


@pytest.mark.parametrize("F, Fo", [(5, 0), (0, 6)])
@pytest.mark.parametrize("pool", [False, True])
def test_graph_conv_weight_without_elements(F, Fo, pool, gen):
    # A (5, 0) or (0, 6) weight is a real weight: zero outputs, or outputs that are act(bias).
    x, A = rand(4, 3, F, gen=gen, requires_grad=True), rand(3, 3, gen=gen)
    W, b = rand(F, Fo, gen=gen, requires_grad=True), rand(Fo, gen=gen, requires_grad=True)
    assignment = torch.tensor([0, 1, 0])
    if pool:
        y, pooled = ops.graph_conv_pool(x, A, assignment, W, b, "elu", None, 2)
    else:
        y = ops.graph_conv(x, A, W, b, "elu")
    want = conv_ref(x, A, W, b, "elu")
    assert y.shape == (4, 3, Fo) and rel_error(y, want) <= 1e-12
    if pool:
        assert rel_error(pooled, pool_ref(want, assignment, None, 2)) <= 1e-12
    g = rand(4, 3, Fo, gen=gen)
    got = torch.autograd.grad(y, (x, W, b), g, allow_unused=True)
    ref = torch.autograd.grad(want, (x, W, b), g, allow_unused=True)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and (a.numel() == 0 or rel_error(a, r) <= 1e-12)


def _c(t):
    from affectkit.ops._bridge import ptr

    return ptr(t)


def test_graph_conv_kernels_write_every_element(gen):
    import affectkit._C as C

    S, N, F, Fo, B = 12, 14, 5, 33, 4
    code = C.DTYPE_CODES["float32"]
    x, A = rand(S, N, F, gen=gen, dtype=torch.float32), rand(B, N, N, gen=gen, dtype=torch.float32)
    W, b = rand(F, Fo, gen=gen, dtype=torch.float32), rand(Fo, gen=gen, dtype=torch.float32)
    out = torch.full((S, N, Fo), float("nan"))
    C.graph_conv_forward(C.DEVICE_CPU, code, _c(x), _c(A), _c(W), _c(b), _c(out), S, N, F, Fo, B, 3)
    xr = x.reshape(B, S // B, N, F)
    want = conv_ref(xr, A, W, b, "leaky_relu").reshape(S, N, Fo)
    assert rel_error(out, want) <= 2e-5
    g = rand(S, N, Fo, gen=gen, dtype=torch.float32)
    grads = [torch.full(s, float("nan")) for s in [(S, N, F), (B, N, N), (F, Fo), (Fo,)]]
    C.graph_conv_backward(C.DEVICE_CPU, code, _c(g), _c(out), _c(x), _c(A), _c(W), *map(_c, grads),
                          S, N, F, Fo, B, 3)
    leaves = [t.double().requires_grad_() for t in (xr, A, W, b)]
    conv_ref(*leaves, "leaky_relu").backward(g.reshape(B, S // B, N, Fo).double())
    for got, leaf in zip(grads, leaves):
        assert rel_error(got, leaf.grad.reshape(got.shape)) <= 2e-5


# ----------------------------------------------------------------------------------------
# graph_conv backward
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 14, 62, 200])
@pytest.mark.parametrize("F, Fo", [(5, 32), (64, 64), (64, 9), (1, 1)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("adjacency_grad", [True, False], ids=["dA", "fixed_A"])
def test_graph_conv_gradients_match_reference(N, F, Fo, per_sample, adjacency_grad, gen):
    # A fixed graph takes another route in the kernel (M = A^T g serves grad x and grad W).
    B = 3
    act = ACTS[(N + F) % len(ACTS)]
    x = rand(B, 2, N, F, gen=gen, requires_grad=True)
    A = (rand(*((B,) if per_sample else ()), N, N, gen=gen) / N**0.5).requires_grad_(adjacency_grad)
    W, b = rand(F, Fo, gen=gen, requires_grad=True), rand(Fo, gen=gen, requires_grad=True)
    g = rand(B, 2, N, Fo, gen=gen)
    leaves = (x, A, W, b) if adjacency_grad else (x, W, b)
    got = torch.autograd.grad(ops.graph_conv(x, A, W, b, act), leaves, g)
    want = torch.autograd.grad(conv_ref(x, A, W, b, act), leaves, g)
    for name, gg, ww in zip("xAWb" if adjacency_grad else "xWb", got, want):
        assert rel_error(gg, ww) <= 1e-12, name


@pytest.mark.parametrize("N", [1, 7, 14, 16, 17, 32, 64, 65])
@pytest.mark.parametrize("F, Fo", [(1, 1), (5, 32), (16, 17), (3, 40)])
@pytest.mark.parametrize("B", [1, 3], ids=["shared", "per_sample"])
@pytest.mark.parametrize("wanted", ["xWb", "xAWb", "AWb", "Ab"])
def test_graph_conv_float32_gradients_small_graphs(N, F, Fo, B, wanted, gen):
    # float32 with W, N <= 64 and F <= 16: the transposed-tile backward on AVX-512 machines
    # (N = 65 takes the general one), for each combination of wanted gradients (a learned
    # graph on fixed inputs, DGCNN-style, wants A and W but not x). Gradients are poisoned.
    import affectkit._C as C

    S, act = 6, (N + F + Fo) % 6
    x, A = rand(S, N, F, gen=gen, dtype=torch.float32), rand(B, N, N, gen=gen, dtype=torch.float32) / N**0.5
    W, b = rand(F, Fo, gen=gen, dtype=torch.float32), rand(Fo, gen=gen, dtype=torch.float32)
    out = torch.empty(S, N, Fo)
    C.graph_conv_forward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(x), _c(A), _c(W), _c(b), _c(out),
                         S, N, F, Fo, B, act)
    g = rand(S, N, Fo, gen=gen, dtype=torch.float32)
    grads = {k: torch.full(shape, float("nan")) for k, shape in
             [("x", (S, N, F)), ("A", (B, N, N)), ("W", (F, Fo)), ("b", (Fo,))] if k in wanted}
    C.graph_conv_backward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(g), _c(out), _c(x), _c(A), _c(W),
                          *(_c(grads[k]) if k in grads else 0 for k in "xAWb"), S, N, F, Fo, B, act)
    raw = {"x": x.reshape(B, S // B, N, F), "A": A, "W": W, "b": b}
    leaves = {k: v.double().requires_grad_() for k, v in raw.items()}
    z = conv_ref(leaves["x"], leaves["A"], leaves["W"], leaves["b"])
    act_on_kernels_side(z, ACTS[act], out).backward(g.reshape(B, S // B, N, Fo).double())
    # A gradient entry is a sum of up to S * N * Fo terms of both signs (one scalar when
    # N = 1 or F = Fo = 1), so float32 is held to 2e-5 of the result plus 2e-6 of the sum of
    # the terms' magnitudes (the same gradients on absolute values, every slope <= 1).
    mags = {k: v.abs().double().requires_grad_() for k, v in raw.items()}
    conv_ref(mags["x"], mags["A"], mags["W"], mags["b"]).backward(g.reshape(B, S // B, N, Fo).double().abs())
    for k, got in grads.items():
        want, mag = leaves[k].grad.reshape(got.shape), mags[k].grad.reshape(got.shape)
        err = torch.linalg.vector_norm(got.double() - want)
        assert err <= 2e-5 * torch.linalg.vector_norm(want) + 2e-6 * torch.linalg.vector_norm(mag), k


@pytest.mark.parametrize("N, F, Fo", [(14, 5, 32), (62, 64, 64)])
def test_graph_conv_gradients_are_deterministic_across_threads_scheduling(N, F, Fo, gen):
    # Threads take chunks of samples as they free up, each chunk with its own partial grad A, W
    # and b, summed in chunk order: which thread ran which chunk must not change a bit.
    x = rand(97, N, F, gen=gen, dtype=torch.float32, requires_grad=True)
    A = rand(N, N, gen=gen, dtype=torch.float32, requires_grad=True)
    W = rand(F, Fo, gen=gen, dtype=torch.float32, requires_grad=True)
    b = rand(Fo, gen=gen, dtype=torch.float32, requires_grad=True)
    g = torch.randn(97, N, Fo, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # chunks run unevenly over 3 threads even on a 2-core machine
        runs = [torch.autograd.grad(ops.graph_conv(x, A, W, b, "relu"), (x, A, W, b), g) for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            assert torch.equal(got, first)


def test_graph_conv_gradient_only_where_needed(gen):
    x, A = rand(4, 14, 5, gen=gen, requires_grad=True), rand(14, 14, gen=gen)
    W = rand(5, 8, gen=gen)
    ops.graph_conv(x, A, W).sum().backward()
    assert A.grad is None and W.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(conv_ref(x, A, W).sum(), x)[0])


@pytest.mark.parametrize("layout", ["broadcast", "node_mean", "feature_slice", "transposed"])
@pytest.mark.parametrize("act", ["relu", "sigmoid", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_conv_backward_reads_strided_grad_out(layout, act, dtype, gen):
    # The kernel reads grad_out through its strides (no copy): the gradients must be exactly
    # those of the same values laid out contiguously. F = 5 takes the AVX-512 tiles in float32.
    from affectkit.ops.graph import _graph_conv_backward

    S, N, F, Fo = 7, 14, 5, 33
    x, A, W, b = (rand(*shape, gen=gen, dtype=dtype) for shape in ((S, N, F), (N, N), (F, Fo), (Fo,)))
    out = ops.graph_conv(x, A, W, b, act)
    if layout == "broadcast":  # what out.sum().backward() sends: strides (0, 0, 0)
        g = torch.full((), 1.7, dtype=dtype).expand(S, N, Fo)
    elif layout == "node_mean":  # a mean over the nodes: strides (Fo, 0, 1)
        g = rand(S, 1, Fo, gen=gen, dtype=dtype).expand(S, N, Fo)
    elif layout == "feature_slice":  # every other feature of a wider tensor: feature stride 2
        g = rand(S, N, 2 * Fo, gen=gen, dtype=dtype)[..., ::2]
    else:  # node-major memory viewed sample-major
        g = rand(N, S, Fo, gen=gen, dtype=dtype).transpose(0, 1)
    assert not g.is_contiguous()
    code = {None: 0, "relu": 1, "sigmoid": 5}[act]
    rest = (out, x, A.unsqueeze(0), W, code, True, True, True, True)
    for got, want in zip(_graph_conv_backward.plain(g, *rest), _graph_conv_backward.plain(g.contiguous(), *rest)):
        assert torch.equal(got, want)
    # Through autograd, against the float64 reference.
    leaves = [t.clone().requires_grad_() for t in (x, A, W, b)]
    refs = [t.detach().clone().requires_grad_() for t in (x, A, W, b)]
    torch.autograd.backward(ops.graph_conv(*leaves, act), g)
    torch.autograd.backward(conv_ref(*refs, act=act), g.double())
    for leaf, ref in zip(leaves, refs):
        assert rel_error(leaf.grad, ref.grad) <= 10 * TOL[dtype]


def test_graph_conv_backward_op_checks_grad_out(gen):
    from affectkit.ops.graph import _graph_conv_backward

    x, A, W = rand(3, 4, 2, gen=gen), rand(1, 4, 4, gen=gen), rand(2, 5, gen=gen)
    out = ops.graph_conv(x, A[0], W)
    rest = (out, x, A, W, 0, True, True, True, True)
    with pytest.raises(TypeError, match=r"grad_out: expected dtype torch.float64 \(the output's\), got torch.float32"):
        _graph_conv_backward.plain(torch.ones(3, 4, 5), *rest)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(3, 4, 5\) \(the output's\), got \(3, 4, 6\)"):
        _graph_conv_backward.plain(torch.ones(3, 4, 6, dtype=torch.float64), *rest)


def test_graph_conv_backward_rejects_bad_grad_out_strides():
    import affectkit._C as C

    x, A, W, out = Z(4, 3, 2), Z(3, 3), Z(2, 5), Z(4, 3, 5)
    f32 = C.DTYPE_CODES["float32"]
    args = (C.DEVICE_CPU, f32, _c(out), _c(out), _c(x), _c(A), _c(W), _c(x), 0, 0, 0, 4, 3, 2, 5, 1, 1, 0)
    with pytest.raises(ValueError, match=r"grad_out_strides: expected element strides in \[0, 2\^50 / size\]"):
        C.graph_conv_backward(*args, (15, -5, 1))
    with pytest.raises(ValueError, match=r"grad_out_strides: .*got 562949953421312 for dimension 0"):
        C.graph_conv_backward(*args, (2**49, 5, 1))
    C.graph_conv_backward(*args, (0, 0, 0))  # a broadcast gradient is valid
    C.graph_conv_backward(*args, None)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("act", ["tanh", None, "elu"])
def test_graph_conv_gradcheck(per_sample, act, gen):
    x = rand(3, 2, 5, 3, gen=gen, requires_grad=True)
    A = rand(*((3,) if per_sample else ()), 5, 5, gen=gen, requires_grad=True)
    W, b = rand(3, 4, gen=gen, requires_grad=True), rand(4, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.graph_conv(*t, act), (x, A, W, b))
    assert torch.autograd.gradcheck(lambda x, A: ops.graph_conv(x, A, None, None, act), (x, A))


# ----------------------------------------------------------------------------------------
# cheb_graph_conv
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 4, 14, 62, 200])
@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("coef_kind", ["scalar", "matrix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cheb_matches_reference_and_gradients(N, K, coef_kind, dtype, gen):
    F, Fo = (5, 5) if coef_kind == "scalar" else (7, 16)
    x = rand(3, 2, N, F, gen=gen, dtype=dtype, requires_grad=True)
    Lm = rand(N, N, gen=gen, dtype=dtype) / N**0.5
    L = (Lm + Lm.T).detach().requires_grad_()
    coef = rand(*((K,) if coef_kind == "scalar" else (K, F, Fo)), gen=gen, dtype=dtype, requires_grad=True)
    got = ops.cheb_graph_conv(x, L, coef)
    want = cheb_ref(x, L, coef)
    assert got.shape == (3, 2, N, Fo)
    assert rel_error(got, want) <= TOL[dtype] * K
    if dtype == torch.float64:
        g = rand(3, 2, N, Fo, gen=gen)
        for name, a, b in zip(["x", "L", "coef"], torch.autograd.grad(got, (x, L, coef), g),
                              torch.autograd.grad(want, (x, L, coef), g, materialize_grads=True)):
            assert rel_error(a, b) <= 1e-11, name


def test_cheb_gradcheck_nonsymmetric_laplacian(gen):
    x = rand(2, 4, 3, gen=gen, requires_grad=True)
    L = rand(4, 4, gen=gen, requires_grad=True)  # not symmetric: exercises L^T in the adjoint
    assert torch.autograd.gradcheck(ops.cheb_graph_conv, (x, L, rand(4, gen=gen, requires_grad=True)))
    assert torch.autograd.gradcheck(ops.cheb_graph_conv, (x, L, rand(3, 3, 2, gen=gen, requires_grad=True)))


def test_cheb_kernel_writes_every_element(gen):
    import affectkit._C as C

    S, N, F, Fo, K = 5, 14, 3, 9, 3
    x, L = rand(S, N, F, gen=gen, dtype=torch.float32), rand(N, N, gen=gen, dtype=torch.float32)
    coef = rand(K, F, Fo, gen=gen, dtype=torch.float32)
    out = torch.full((S, N, Fo), float("nan"))
    C.cheb_graph_conv_forward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(x), _c(L), _c(coef), _c(out),
                              S, N, F, Fo, K, True)
    assert rel_error(out, cheb_ref(x, L, coef)) <= 2e-5
    g = rand(S, N, Fo, gen=gen, dtype=torch.float32)
    grads = [torch.full(t.shape, float("nan")) for t in (x, L, coef)]
    C.cheb_graph_conv_backward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(g), _c(x), _c(L), _c(coef),
                               *map(_c, grads), S, N, F, Fo, K, True)
    leaves = [t.double().requires_grad_() for t in (x, L, coef)]
    cheb_ref(*leaves).backward(g.double())
    for got, leaf in zip(grads, leaves):
        assert rel_error(got, leaf.grad) <= 2e-5


# ----------------------------------------------------------------------------------------
# hierarchical_pool and the fused level
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("N, P", [(1, 1), (14, 4), (32, 5), (62, 10), (200, 7), (4, 4)])
@pytest.mark.parametrize("attention", [False, True], ids=["mean", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_matches_reference_and_gradients(N, P, attention, dtype, gen):
    F = 5 + N % 7
    assignment = random_assignment(N, P, gen)
    x = rand(3, 2, N, F, gen=gen, dtype=dtype, requires_grad=True)
    scores = rand(3, 2, N, gen=gen, dtype=dtype, requires_grad=True) if attention else None
    got = ops.hierarchical_pool(x, assignment, scores)
    want = pool_ref(x, assignment, scores, P)
    assert got.shape == (3, 2, P, F)
    assert rel_error(got, want) <= TOL[dtype]
    if dtype == torch.float64:
        leaves = (x, scores) if attention else (x,)
        g = rand(3, 2, P, F, gen=gen)
        for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            assert rel_error(a, b) <= 1e-12


def test_pool_gradcheck_and_kernel_writes_every_element(gen):
    import affectkit._C as C

    assignment = torch.tensor([2, 0, 0, 1, 2, 2, 0], dtype=torch.int32)
    x, s = rand(3, 7, 4, gen=gen, requires_grad=True), rand(3, 7, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: ops.hierarchical_pool(x, assignment, s, 3), (x, s))
    assert torch.autograd.gradcheck(lambda x: ops.hierarchical_pool(x, assignment), (x,))
    a64 = assignment.long()
    xf, sf = x.detach().float(), s.detach().float()
    out = torch.full((3, 3, 4), float("nan"))
    C.hierarchical_pool_forward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(xf), _c(a64), _c(sf), _c(out), 3, 7, 4, 3)
    assert rel_error(out, pool_ref(xf, a64, sf, 3)) <= 2e-5
    gx, gs = torch.full((3, 7, 4), float("nan")), torch.full((3, 7), float("nan"))
    C.hierarchical_pool_backward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], _c(out), _c(xf), _c(a64), _c(sf),
                                 _c(gx), _c(gs), 3, 7, 4, 3)
    xd, sd = xf.double().requires_grad_(), sf.double().requires_grad_()
    pool_ref(xd, a64, sd, 3).backward(out.double())
    assert rel_error(gx, xd.grad) <= 2e-5 and rel_error(gs, sd.grad) <= 2e-5


@pytest.mark.parametrize("N, P, F, Fo", [(14, 4, 5, 32), (62, 10, 64, 64), (32, 5, 7, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("attention", [False, True], ids=["mean", "softmax"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_graph_conv_pool_matches_composition(N, P, F, Fo, attention, per_sample, gen):
    assignment = random_assignment(N, P, gen)
    x = rand(4, 3, N, F, gen=gen, requires_grad=True)
    A = (rand(*((4,) if per_sample else ()), N, N, gen=gen) / N**0.5).requires_grad_()
    W, b = rand(F, Fo, gen=gen, requires_grad=True), rand(Fo, gen=gen, requires_grad=True)
    scores = rand(4, 3, N, gen=gen, requires_grad=True) if attention else None
    node, pooled = ops.graph_conv_pool(x, A, assignment, W, b, "relu", scores)
    node_ref = conv_ref(x, A, W, b, "relu")
    pooled_ref = pool_ref(node_ref, assignment, scores, P)
    assert rel_error(node, node_ref) <= 1e-12 and rel_error(pooled, pooled_ref) <= 1e-12
    leaves = [t for t in (x, A, W, b, scores) if t is not None]
    gn, gp = rand(*node.shape, gen=gen), rand(*pooled.shape, gen=gen)
    got = torch.autograd.grad((node * gn).sum() + (pooled * gp).sum(), leaves)
    want = torch.autograd.grad((node_ref * gn).sum() + (pooled_ref * gp).sum(), leaves)
    for a, b_ in zip(got, want):
        assert rel_error(a, b_) <= 1e-12


def test_graph_conv_pool_gradcheck(gen):
    assignment = torch.tensor([1, 0, 1, 0, 2])
    x, A = rand(2, 5, 3, gen=gen, requires_grad=True), rand(5, 5, gen=gen, requires_grad=True)
    W, b = rand(3, 2, gen=gen, requires_grad=True), rand(2, gen=gen, requires_grad=True)
    s = rand(2, 5, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: ops.graph_conv_pool(t[0], t[1], assignment, t[2], t[3], "tanh", t[4], 3), (x, A, W, b, s))


# ----------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------


def test_opcheck_every_op(gen):
    aff = torch.ops.affectkit
    x, A = rand(4, 5, 3, gen=gen, requires_grad=True), rand(2, 5, 5, gen=gen, requires_grad=True)
    W, b = rand(3, 6, gen=gen, requires_grad=True), rand(6, gen=gen, requires_grad=True)
    assignment = torch.tensor([0, 1, 1, 0, 2])
    s = rand(4, 5, gen=gen, requires_grad=True)
    torch.library.opcheck(aff.graph_conv.default, (x, A, W, b, 1))
    torch.library.opcheck(aff.graph_conv.default, (x, A[:1], None, None, 4))
    out = aff.graph_conv(x, A, W, b, 4)
    g = rand(4, 5, 6, gen=gen)
    # The backward ops have no double-backward formula: check them on plain tensors.
    xd, Ad, Wd, sd = x.detach(), A.detach(), W.detach(), s.detach()
    torch.library.opcheck(aff.graph_conv_backward.default, (g, out.detach(), xd, Ad, Wd, 4, True, True, True, True))
    torch.library.opcheck(aff.graph_conv_backward.default, (g, out.detach(), xd, Ad, Wd, 4, False, True, False, True))
    torch.library.opcheck(aff.hierarchical_pool.default, (x, assignment, s, 3))
    torch.library.opcheck(aff.hierarchical_pool.default, (x, assignment, None, 3))
    torch.library.opcheck(aff.hierarchical_pool_backward.default, (rand(4, 3, 3, gen=gen), xd, assignment, sd, True, True))
    torch.library.opcheck(aff.graph_conv_pool.default, (x, A, W, b, 2, assignment, s, 3))
    torch.library.opcheck(aff.graph_conv_pool.default, (x, A[:1], None, None, 0, assignment, None, 3))
    L = rand(5, 5, gen=gen, requires_grad=True)
    for coef in (rand(3, gen=gen, requires_grad=True), rand(2, 3, 4, gen=gen, requires_grad=True)):
        torch.library.opcheck(aff.cheb_graph_conv.default, (x, L, coef))
        Fo = 3 if coef.dim() == 1 else 4
        torch.library.opcheck(aff.cheb_graph_conv_backward.default, (rand(4, 5, Fo, gen=gen), xd, L.detach(), coef.detach(), True, True, True))


def _level(x, A, W, b, assignment, scores, L, coef):
    node, pooled = ops.graph_conv_pool(x, A, assignment, W, b, "elu", scores, 3)
    y = ops.cheb_graph_conv(node, L, coef)
    z = ops.graph_conv(x, A, W, None, "relu")
    return (y * y).sum() + pooled.sum() + ops.hierarchical_pool(z, assignment, None, 3).pow(2).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(backend, gen):
    torch._dynamo.reset()
    step = torch.compile(_level, backend=backend, fullgraph=True, dynamic=True)
    for S in (6, 11):  # two batch sizes: dynamic shapes, no recompile per size
        N, F, Fo = 7, 3, 5
        x = rand(S, N, F, gen=gen, dtype=torch.float32, requires_grad=True)
        A = rand(N, N, gen=gen, dtype=torch.float32, requires_grad=True)
        W = rand(F, Fo, gen=gen, dtype=torch.float32, requires_grad=True)
        b = rand(Fo, gen=gen, dtype=torch.float32, requires_grad=True)
        scores = rand(S, N, gen=gen, dtype=torch.float32, requires_grad=True)
        L = rand(N, N, gen=gen, dtype=torch.float32, requires_grad=True)
        coef = rand(3, gen=gen, dtype=torch.float32, requires_grad=True)
        assignment = torch.tensor([0, 1, 2, 0, 1, 2, 2])
        inputs = (x, A, W, b, assignment, scores, L, coef)
        loss = step(*inputs)
        leaves = [t for t in inputs if t.requires_grad]
        got = torch.autograd.grad(loss, leaves)
        want_loss = _level(*inputs)
        want = torch.autograd.grad(want_loss, leaves)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for a, b_ in zip(got, want):
            assert rel_error(a, b_) <= 1e-5


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------

Z = torch.zeros


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 5)), ValueError, r"adjacency: expected a square matrix"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(2, 2, 4, 4)), ValueError, r"adjacency: expected a square matrix"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(5, 5)), ValueError, r"adjacency: expected N = 4 nodes \(x.shape\[-2\]\), got 5"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(3, 4, 4)), ValueError, r"adjacency: expected B = 2 graphs \(x.shape\[0\]\), got 3"),
        (lambda: ops.graph_conv(Z(4, 3), Z(1, 4, 4)), ValueError, r"adjacency: a batch of graphs"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 4, dtype=torch.float64)), TypeError, r"adjacency: expected dtype float32 \(the dtype of x\)"),
        (lambda: ops.graph_conv(Z(2, 4, 3), [[1.0]]), TypeError, r"adjacency: expected a torch.Tensor, got list"),
        (lambda: ops.graph_conv(Z(3), Z(3, 3)), ValueError, r"x: expected a tensor \(\.\.\., N, F\)"),
        (lambda: ops.graph_conv(Z(2, 4, 3, dtype=torch.int64), Z(4, 4)), TypeError, r"x: expected dtype float32, float64"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 4), Z(4, 8)), ValueError, r"weight: expected shape \(F, F_out\) with F = 3"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 4), Z(3, 8), Z(7)), ValueError, r"bias: expected shape \(8,\)"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 4), activation="gelu"), ValueError, r"activation: expected one of"),
        (lambda: ops.graph_conv(Z(2, 4, 3), Z(4, 4), activation=1), TypeError, r"activation: expected None or a name"),
        (lambda: ops.graph_conv(Z(2, 4, 3), torch.full((4, 4), float("nan"))), ValueError, r"adjacency: expected finite values"),
        (lambda: ops.graph_conv(Z(2, 4, 3), torch.eye(4).repeat(2, 1, 1).index_put_((torch.tensor([1]), torch.tensor([0]), torch.tensor([2])), torch.tensor(float("nan")))),
         ValueError, r"adjacency: expected finite values, got NaN or infinity in adjacency\[1\]"),
        (lambda: ops.cheb_graph_conv(Z(2, 4, 3), Z(4, 5), Z(2)), ValueError, r"laplacian: expected a square matrix \(N, N\)"),
        (lambda: ops.cheb_graph_conv(Z(2, 4, 3), Z(2, 4, 4), Z(2)), ValueError, r"laplacian: expected a square matrix \(N, N\)"),
        (lambda: ops.cheb_graph_conv(Z(2, 4, 3), Z(4, 4), Z(0)), ValueError, r"coefficients: expected shape \(K,\) or \(K, F, F_out\)"),
        (lambda: ops.cheb_graph_conv(Z(2, 4, 3), Z(4, 4), Z(2, 4, 5)), ValueError, r"coefficients: expected shape"),
        (lambda: ops.cheb_graph_conv(Z(2, 4, 3), torch.full((4, 4), float("inf")), Z(2)), ValueError, r"laplacian: expected finite values"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, 1, 2, 3]), num_parents=3), ValueError,
         r"assignment: expected parent indices in \[0, 2\], got assignment\[3\] = 3"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, -1, 1, 1])), ValueError, r"assignment: expected parent indices in \[0, 1\]"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, 0, 2, 2])), ValueError,
         r"assignment: expected every parent in \[0, 2\] to have at least one child, got none for parent 1"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, 0, 1])), ValueError, r"assignment: expected one parent per node, N = 4"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0.0, 0, 1, 1])), TypeError, r"assignment: expected dtype int32, int64"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, 0, 1, 1]), Z(2, 3)), ValueError, r"scores: expected shape \(2, 4\)"),
        (lambda: ops.hierarchical_pool(Z(2, 4, 3), torch.tensor([0, 0, 1, 1]), num_parents=-1), ValueError, r"num_parents: expected a count >= 0"),
        (lambda: ops.graph_conv_pool(Z(2, 4, 3), Z(4, 4), torch.tensor([0, 0, 1, 5]), num_parents=2), ValueError,
         r"assignment: expected parent indices in \[0, 1\], got assignment\[3\] = 5"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_core_validates_what_it_receives():
    import affectkit._C as C

    x, A = Z(4, 3, 2), Z(3, 3)
    f32 = C.DTYPE_CODES["float32"]
    with pytest.raises(ValueError, match=r"adjacency: expected the number of graphs B to divide"):
        C.graph_conv_forward(C.DEVICE_CPU, f32, _c(x), _c(A), 0, 0, _c(x), 4, 3, 2, 2, 3, 0)
    with pytest.raises(ValueError, match=r"Fo: expected Fo == F = 2 without a weight"):
        C.graph_conv_forward(C.DEVICE_CPU, f32, _c(x), _c(A), 0, 0, _c(x), 4, 3, 2, 5, 1, 0)
    with pytest.raises(ValueError, match=r"activation: expected an activation code in \[0, 5\]"):
        C.graph_conv_forward(C.DEVICE_CPU, f32, _c(x), _c(A), 0, 0, _c(x), 4, 3, 2, 2, 1, 9)
    with pytest.raises(ValueError, match=r"x: .*null"):
        C.graph_conv_forward(C.DEVICE_CPU, f32, 0, _c(A), 0, 0, _c(x), 4, 3, 2, 2, 1, 0)
    with pytest.raises(ValueError, match=r"K: expected at least one Chebyshev coefficient"):
        C.cheb_graph_conv_forward(C.DEVICE_CPU, f32, _c(x), _c(A), _c(A), _c(x), 4, 3, 2, 2, 0, False)
    a = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match=r"assignment: expected parent indices in \[0, 1\]"):
        C.hierarchical_pool_forward(C.DEVICE_CPU, f32, _c(x), _c(a), 0, _c(x), 4, 3, 2, 2)
    with pytest.raises(TypeError, match=r"int64"):
        C.graph_conv_forward(C.DEVICE_CPU, C.DTYPE_CODES["int64"], _c(x), _c(A), 0, 0, _c(x), 4, 3, 2, 2, 1, 0)


# ----------------------------------------------------------------------------------------
# CUDA (runs only where a GPU is visible)
# ----------------------------------------------------------------------------------------

CUDA_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("N, F, Fo", [(1, 1, 1), (14, 5, 32), (32, 5, 32), (62, 64, 64), (200, 7, 3), (17, 33, 9)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_graph_conv_matches_reference(dtype, N, F, Fo, per_sample, gen):
    B = 5
    x = rand(B, 3, N, F, gen=gen)
    A = rand(*((B,) if per_sample else ()), N, N, gen=gen) / N**0.5
    W, b = rand(F, Fo, gen=gen) / F**0.5, rand(Fo, gen=gen)
    act = ACTS[(N + F) % len(ACTS)]
    cu = [t.to("cuda", dtype) for t in (x, A, W, b)]
    got = ops.graph_conv(*cu, act)
    want = conv_ref(*[t.cpu() for t in cu], act)
    assert rel_error(got.cpu(), want) <= CUDA_TOL[dtype]
    leaves = [t.detach().requires_grad_() for t in cu]
    g = rand(B, 3, N, Fo, gen=gen)
    grads = torch.autograd.grad(ops.graph_conv(*leaves, act), leaves, g.to("cuda", dtype))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in cu]
    want_grads = torch.autograd.grad(conv_ref(*ref_leaves, act), ref_leaves, g.double())
    if dtype in (torch.float16, torch.bfloat16):
        # Elementwise against the size of what each gradient sums (the same products on |inputs|):
        # a gradient that cancels to near zero (N = F = 1 sums a few terms) has no meaningful
        # relative error at 16-bit precision, while a wrong kernel still misses this bound.
        abs_leaves = [t.detach().cpu().double().abs().requires_grad_() for t in cu]
        scale = torch.autograd.grad(conv_ref(*abs_leaves, None), abs_leaves, g.double().abs())
        for a, w, sc in zip(grads, want_grads, scale):
            assert ((a.cpu().double() - w).abs() <= 4 * CUDA_TOL[dtype] * (sc + sc.max() * 1e-3)).all()
    else:
        for a, w in zip(grads, want_grads):
            assert rel_error(a.cpu(), w) <= 4 * CUDA_TOL[dtype]


@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL))
@pytest.mark.parametrize("N, P", [(14, 4), (62, 10), (200, 7)])
def test_cuda_pool_cheb_and_level(dtype, N, P, gen):
    assignment = random_assignment(N, P, gen)
    x, s = rand(6, N, 9, gen=gen), rand(6, N, gen=gen)
    cu = lambda t: t.to("cuda", dtype)  # noqa: E731
    for scores in (None, s):
        got = ops.hierarchical_pool(cu(x), assignment.cuda(), None if scores is None else cu(scores))
        want = pool_ref(cu(x).cpu(), assignment, None if scores is None else cu(scores).cpu(), P)
        assert rel_error(got.cpu(), want) <= CUDA_TOL[dtype]
    L = rand(N, N, gen=gen) / N
    for coef in (rand(3, gen=gen), rand(3, 9, 4, gen=gen) / 3):
        got = ops.cheb_graph_conv(cu(x), cu(L), cu(coef))
        assert rel_error(got.cpu(), cheb_ref(cu(x).cpu(), cu(L).cpu(), cu(coef).cpu())) <= 4 * CUDA_TOL[dtype]
    A, W = rand(N, N, gen=gen) / N**0.5, rand(9, 16, gen=gen) / 3
    node, pooled = ops.graph_conv_pool(cu(x), cu(A), assignment.cuda(), cu(W), None, "relu", cu(s))
    node_ref = conv_ref(cu(x).cpu(), cu(A).cpu(), cu(W).cpu(), None, "relu")
    assert rel_error(node.cpu(), node_ref) <= CUDA_TOL[dtype]
    assert rel_error(pooled.cpu(), pool_ref(node_ref, assignment, cu(s).cpu(), P)) <= 2 * CUDA_TOL[dtype]


@requires_cuda
def test_cuda_stream_errors_opcheck_and_compile(gen):
    x, A = rand(8, 14, 5, gen=gen, dtype=torch.float32).cuda(), rand(14, 14, gen=gen, dtype=torch.float32).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = ops.graph_conv(x, A, activation="relu")
    stream.synchronize()
    assert rel_error(got.cpu(), conv_ref(x.cpu(), A.cpu(), act="relu")) <= 2e-5
    with pytest.raises(ValueError, match="adjacency: expected a tensor on cuda"):
        ops.graph_conv(x, A.cpu())
    with pytest.raises(ValueError, match="assignment: expected every parent"):
        ops.hierarchical_pool(x, torch.zeros(14, dtype=torch.int64, device="cuda"), num_parents=2)
    xs = x[:4, :5, :3].double().requires_grad_()
    torch.library.opcheck(torch.ops.affectkit.graph_conv.default, (xs, A[:5, :5].double()[None], None, None, 4))
    torch._dynamo.reset()
    step = torch.compile(_level, backend="inductor", fullgraph=True, dynamic=True)
    args = [rand(*s, gen=gen, dtype=torch.float32).cuda().requires_grad_() for s in [(6, 7, 3), (7, 7), (3, 5), (5,)]]
    extra = [torch.tensor([0, 1, 2, 0, 1, 2, 2], device="cuda"), rand(6, 7, gen=gen, dtype=torch.float32).cuda(),
             rand(7, 7, gen=gen, dtype=torch.float32).cuda(), rand(3, gen=gen, dtype=torch.float32).cuda()]
    step(*args, *extra).backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


@pytest.mark.parametrize("assignment, P, match", [
    ([0, 2, 1, 3], 3, r"expected parent indices in \[0, 2\], got 3"),
    ([0, -2, 1, 1], 2, r"expected parent indices in \[0, 1\], got -2"),
    ([0, 0, 2, 2], 3, r"expected every parent in \[0, 2\] to have at least one child, got none for parent 1"),
    ([], 2, r"expected every parent in \[0, 1\] to have at least one child, got none for parent 0"),
    ([0], 0, r"expected parent indices in \[0, -1\], got 0"),
])
def test_cuda_assignment_checks_on_the_host(assignment, P, match):
    # The helper the CUDA path uses (the CPU core checks its own values); plain torch, so it
    # runs on CPU tensors here.
    from affectkit.ops.graph import _check_assignment_values

    with pytest.raises(ValueError, match="assignment: " + match):
        _check_assignment_values(torch.tensor(assignment, dtype=torch.int64), P)
    for good, P_ in (([1, 0, 2, 2, 1], 3), ([], 0), ([0], 1)):
        _check_assignment_values(torch.tensor(good, dtype=torch.int64), P_)
    # Other scalars ride on the same read back (graph_conv_pool's adjacency check).
    assert _check_assignment_values(torch.tensor([1, 0, 1]), 2, [torch.tensor(7), torch.tensor(-3)]) == [7, -3]
    assert _check_assignment_values(torch.tensor([], dtype=torch.int64), 0, [torch.tensor(4)]) == [4]


@requires_cuda
def test_cuda_assignment_is_checked_with_one_synchronisation(gen):
    x = rand(8, 14, 5, gen=gen, dtype=torch.float32).cuda()
    assignment = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3], device="cuda")
    syncs = cuda_synchronisations(lambda: ops.hierarchical_pool(x, assignment, num_parents=4))
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("shape, bad, want", [
    ((5, 5), None, -1), ((5, 5), (3, 1), 0), ((4, 5, 5), (2, 0, 4), 2), ((4, 5, 5), (0, 4, 4), 0),
    ((4, 5, 5), None, -1), ((0, 5, 5), None, -1), ((1, 1), (0, 0), 0),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_first_non_finite_graph(shape, bad, want, value, gen):
    # The CUDA side's finite check (the CPU core checks its own); plain torch, so it runs on
    # CPU tensors here.
    from affectkit.ops._finite import first_non_finite_graph

    t = rand(*shape, gen=gen, dtype=torch.float32)
    if bad is not None:
        t[bad] = value
    assert first_non_finite_graph(t) == want


def test_finite_checks_remember_each_tensor_version(gen, monkeypatch):
    from affectkit.ops import _finite

    checks, reads = _finite.FiniteChecks(), []
    counted = _finite.first_non_finite_graph
    monkeypatch.setattr(_finite, "first_non_finite_graph", lambda t: reads.append(t.shape) or counted(t))
    A = rand(6, 6, gen=gen, dtype=torch.float32)
    checks.check("adjacency", A)
    checks.check("adjacency", A.unsqueeze(0))   # another place in the storage: read once more
    checks.check("adjacency", A)
    checks.check("adjacency", A.unsqueeze(0))
    assert reads == [(6, 6), (1, 6, 6)]
    A.mul_(2.0)                                  # a write bumps the version: read again
    checks.check("adjacency", A)
    assert len(reads) == 3
    A[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^adjacency: expected finite values, got NaN or infinity$"):
        checks.check("adjacency", A)
    batch = rand(3, 6, 6, gen=gen, dtype=torch.float32)
    batch[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"laplacian: expected finite values, got NaN or infinity in laplacian\[2\]"):
        checks.check("laplacian", batch)
    with pytest.raises(ValueError, match=r"laplacian: .*in laplacian\[2\]"):   # a failure is not remembered
        checks.check("laplacian", batch)
    with torch.inference_mode():                 # no version counter: read on every call
        B = rand(4, 4, gen=gen, dtype=torch.float32).clone()
        checks.check("adjacency", B)
        checks.check("adjacency", B)
    assert len(reads) == 8
    del A                                        # a freed storage leaves the record
    import gc
    gc.collect()
    assert len(checks._seen) == 0


@requires_cuda
def test_cuda_non_finite_graphs_are_refused(gen):
    x = rand(4, 7, 3, gen=gen, dtype=torch.float32).cuda()
    A = rand(7, 7, gen=gen, dtype=torch.float32).cuda()
    assignment = torch.tensor([0, 0, 1, 1, 2, 2, 2], device="cuda")
    first = cuda_synchronisations(lambda: ops.graph_conv(x, A))
    again = cuda_synchronisations(lambda: ops.graph_conv(x, A))
    assert len(first) == 1 and not again, (first, again)   # checked once per tensor version
    A[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"^adjacency: expected finite values, got NaN or infinity$"):
        ops.graph_conv(x, A)
    with pytest.raises(ValueError, match=r"^adjacency: expected finite values"):
        ops.graph_conv_pool(x, A, assignment, num_parents=3)
    fresh = rand(7, 7, gen=gen, dtype=torch.float32).cuda()
    level = lambda: ops.graph_conv_pool(x, fresh, assignment, num_parents=3)  # noqa: E731
    first, again = cuda_synchronisations(level), cuda_synchronisations(level)
    assert len(first) == 1 and len(again) == 1, (first, again)   # read back with the assignment's values
    per_sample = rand(4, 7, 7, gen=gen, dtype=torch.float32).cuda()
    per_sample[3, 6, 0] = float("inf")
    with pytest.raises(ValueError, match=r"in adjacency\[3\]"):
        ops.graph_conv(x, per_sample)
    L = rand(7, 7, gen=gen, dtype=torch.float32).cuda()
    L[0, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"^laplacian: expected finite values"):
        ops.cheb_graph_conv(x, L, torch.ones(3, device="cuda"))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("act", [0, 1, 2, 3, 4, 5])
def test_pytorch_backward_used_on_cuda_matches_the_cpu_kernel(per_sample, act, gen):
    # On CUDA the backward ops run as PyTorch products; they are device-agnostic, so check
    # them here against the CPU kernel.
    from affectkit.ops.graph import _cheb_backward_torch, _conv_backward_torch

    x = rand(6, 14, 5, gen=gen)
    A = rand(*((3,) if per_sample else (1,)), 14, 14, gen=gen) / 4
    W = rand(5, 9, gen=gen)
    out = torch.ops.affectkit.graph_conv(x, A, W, None, act)
    g = rand(6, 14, 9, gen=gen)
    want = torch.ops.affectkit.graph_conv_backward(g, out, x, A, W, act, True, True, True, True)
    got = _conv_backward_torch(g, out, x, A, W, act, True, True, True, True)
    for a, b in zip(got, want):
        assert rel_error(a, b) <= 1e-12
    L = rand(14, 14, gen=gen) / 4
    for coef in [rand(K, gen=gen) for K in (1, 2, 3, 5)] + [rand(K, 5, 9, gen=gen) for K in (1, 2, 4)]:
        Fo = 5 if coef.dim() == 1 else 9
        g = rand(6, 14, Fo, gen=gen)
        want = torch.ops.affectkit.cheb_graph_conv_backward(g, x, L, coef, True, True, True)
        with torch.no_grad():  # it must not need autograd (under torch.compile it runs below it)
            got = _cheb_backward_torch(g, x, L, coef, True, True, True)
        for a, b in zip(got, want):
            assert rel_error(a, b) <= 1e-12


# ----------------------------------------------------------------------------------------
# CUDA graph_conv forward: both kernels, called directly with poisoned outputs
# ----------------------------------------------------------------------------------------
#
# graph_conv_forward_cuda sends a shared graph (B == 1) without pooling and with a small sample
# ((N*F + N*M) accumulators <= 2 KB, M = F for (A x) W when F <= Fo, else Fo; M = 0 without a
# weight) to a warp-per-sample kernel, and everything else (B > 1, pooling, large samples) to
# the tiled kernel. The output buffers are filled with NaN and followed by a guard region, so
# an element left unwritten or a write past the end fails the test.

WARP_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_GUARD = 64  # elements after each output that must stay untouched
_GUARD_VALUE = 12345.0


def _tol(dtype, act):
    # On CUDA, float32 tanh is built with --use_fast_math as tanh.approx.f32 (relative error
    # up to about 2^-11), far above 2e-5; every other activation stays within 2e-5.
    if dtype == torch.float32 and act == "tanh":
        return 1e-3
    return WARP_TOL[dtype]


def _poisoned(n, dtype):
    buf = torch.full((n + _GUARD,), float("nan"), dtype=dtype, device="cuda")
    buf[n:] = _GUARD_VALUE
    return buf


def _check_guard(buf, n):
    assert (buf[n:] == _GUARD_VALUE).all(), "a kernel wrote past the end of its output"


def _cuda_conv_raw(x, A, W, b, act, assignment=None, scores=None, P=0):
    """graph_conv_forward (or graph_conv_pool_forward with an assignment) on CUDA tensors,
    straight through affectkit._C: x (S, N, F), A (N, N) or (B, N, N). Returns the output
    (S, N, Fo) (and the pooled (S, P, Fo)) after checking the guard regions."""
    import affectkit._C as C

    S, N, F = x.shape
    Fo = F if W is None else W.shape[1]
    B = 1 if A.dim() == 2 else A.shape[0]
    code = C.DTYPE_CODES[str(x.dtype).removeprefix("torch.")]
    stream = torch.cuda.current_stream().cuda_stream
    n = S * N * Fo
    out = _poisoned(n, x.dtype)
    opt = lambda t: 0 if t is None else _c(t)  # noqa: E731
    act_code = ACTS.index(act)
    if assignment is None:
        C.graph_conv_forward(C.DEVICE_CUDA, code, _c(x), _c(A), opt(W), opt(b), _c(out), S, N, F, Fo, B,
                             act_code, stream)
        torch.cuda.synchronize()
        _check_guard(out, n)
        return out[:n].reshape(S, N, Fo)
    pooled = _poisoned(S * P * Fo, x.dtype)
    C.graph_conv_pool_forward(C.DEVICE_CUDA, code, _c(x), _c(A), opt(W), opt(b), _c(assignment), opt(scores),
                              _c(out), _c(pooled), S, N, F, Fo, B, P, act_code, stream)
    torch.cuda.synchronize()
    _check_guard(out, n)
    _check_guard(pooled, S * P * Fo)
    return out[:n].reshape(S, N, Fo), pooled[: S * P * Fo].reshape(S, P, Fo)


def _cuda_inputs(S, N, F, Fo, B, with_w, with_b, dtype, gen):
    """CUDA inputs in dtype and their float64 CPU copies (rounded to dtype first)."""
    x = rand(S, N, F, gen=gen)
    A = rand(*((B,) if B > 1 else ()), N, N, gen=gen) / N**0.5
    W = rand(F, Fo, gen=gen) / max(F, 1) ** 0.5 if with_w else None
    b = rand(Fo, gen=gen) if with_b else None
    cu = [None if t is None else t.to("cuda", dtype) for t in (x, A, W, b)]
    ref = [None if t is None else t.cpu().double() for t in cu]
    return cu, ref


def _conv_ref_grouped(x, A, W, b, act):
    """conv_ref for x (S, N, F) with A (N, N) or (B, N, N), sample s using graph s // (S // B)."""
    if A.dim() == 2:
        return conv_ref(x, A, W, b, act)
    B, (S, N, _) = A.shape[0], x.shape
    y = conv_ref(x.reshape(B, S // B, N, -1), A, W, b, act)
    return y.reshape(S, N, -1)


# Warp-kernel shapes and, past the per-warp budget (2 KB: e.g. N >= 13 with 32 -> 32, N = 32
# with 5 -> 32 in float64), the same calls on the tiled kernel.
@requires_cuda
@pytest.mark.parametrize("dtype", list(WARP_TOL))
@pytest.mark.parametrize("N", [1, 2, 13, 14, 32])
@pytest.mark.parametrize("F, Fo", [(5, 32), (32, 32), (32, 5), (1, 1), (7, 33)])
def test_cuda_graph_conv_shared_graph_every_variant(dtype, N, F, Fo, gen):
    combos = list(itertools.product(ACTS, [True, False], [True, False]))  # activation, weight, bias
    calls = [(act, w, b, [1, 7, 8, 9, 17][i % 5]) for i, (act, w, b) in enumerate(combos)]
    calls.append((*combos[(N + F + Fo) % len(combos)], 8193))  # a grid-stride loop over many samples
    for act, with_w, with_b, S in calls:
        fo = Fo if with_w else F
        cu, ref = _cuda_inputs(S, N, F, fo, 1, with_w, with_b, dtype, gen)
        got = _cuda_conv_raw(*cu, act)
        assert got.shape == (S, N, fo)
        assert not torch.isnan(got).any(), (act, with_w, with_b, S)
        err = rel_error(got.cpu(), conv_ref(*ref, act))
        assert err <= _tol(dtype, act), (act, with_w, with_b, S, err)


@requires_cuda
@pytest.mark.parametrize("dtype", list(WARP_TOL))
@pytest.mark.parametrize(
    "S, N, F, Fo, B",
    [
        (27, 14, 5, 32, 3),  # one graph per group of samples
        (8, 14, 32, 32, 8),
        (9, 1, 1, 1, 9),
        (10, 62, 64, 64, 1),  # large samples with a shared graph
        (19, 32, 32, 32, 1),
        (6, 200, 7, 3, 1),
        (6, 62, 64, 9, 2),
    ],
)
def test_cuda_graph_conv_tiled_kernel_shapes(dtype, S, N, F, Fo, B, gen):
    # Shared-graph shapes too large for the warp kernel with a weight (without one, the
    # float32 N = 32 32 -> 32 sample just fits it).
    for i, act in enumerate(ACTS):
        with_w, with_b = i % 3 != 2, i % 2 == 0
        fo = Fo if with_w else F
        cu, ref = _cuda_inputs(S, N, F, fo, B, with_w, with_b, dtype, gen)
        got = _cuda_conv_raw(*cu, act)
        assert not torch.isnan(got).any(), (act, with_w, with_b)
        err = rel_error(got.cpu(), _conv_ref_grouped(*ref, act))
        assert err <= _tol(dtype, act), (act, with_w, with_b, err)


@requires_cuda
@pytest.mark.parametrize("dtype", list(WARP_TOL))
@pytest.mark.parametrize("S, N, P, F, Fo, B", [(16, 14, 4, 5, 32, 1), (9, 14, 4, 5, 32, 3), (11, 13, 13, 1, 1, 1)])
@pytest.mark.parametrize("attention", [False, True], ids=["mean", "softmax"])
def test_cuda_graph_conv_pool_tiled_kernel(dtype, S, N, P, F, Fo, B, attention, gen):
    # Pooling always takes the tiled kernel, also for shapes the warp kernel takes without it.
    assignment = random_assignment(N, P, gen)
    scores = rand(S, N, gen=gen) if attention else None
    cu, ref = _cuda_inputs(S, N, F, Fo, B, True, True, dtype, gen)
    s_cu = None if scores is None else scores.to("cuda", dtype)
    node, pooled = _cuda_conv_raw(*cu, "relu", assignment=assignment.cuda(), scores=s_cu, P=P)
    node_ref = _conv_ref_grouped(*ref, "relu")
    assert rel_error(node.cpu(), node_ref) <= WARP_TOL[dtype]
    pool_want = pool_ref(node_ref, assignment, None if s_cu is None else s_cu.cpu(), P)
    assert rel_error(pooled.cpu(), pool_want) <= 2 * WARP_TOL[dtype]
    # The same level without pooling (on the warp kernel where it fits) gives the same nodes.
    assert rel_error(_cuda_conv_raw(*cu, "relu").cpu(), node_ref) <= WARP_TOL[dtype]


@requires_cuda
@pytest.mark.parametrize("dtype", list(WARP_TOL))
def test_cuda_graph_conv_public_op_on_the_warp_kernel(dtype, gen):
    # Through ops.graph_conv: leading dimensions, a transposed weight, a shared graph.
    x = rand(4, 33, 14, 5, gen=gen).to("cuda", dtype)
    A = (rand(14, 14, gen=gen) / 14**0.5).to("cuda", dtype)
    W = (rand(32, 5, gen=gen) / 5**0.5).to("cuda", dtype).T
    b = rand(32, gen=gen).to("cuda", dtype)
    for act in ACTS:
        got = ops.graph_conv(x, A, W, b, act)
        assert got.shape == (4, 33, 14, 32) and got.dtype == dtype
        want = conv_ref(*(t.cpu() for t in (x, A, W, b)), act)
        assert rel_error(got.cpu(), want) <= _tol(dtype, act), act
