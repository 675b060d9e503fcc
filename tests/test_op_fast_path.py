"""Eager calls skip the custom-op dispatcher (ops._bridge.call_direct_or_op); anything that
needs the dispatcher (modes, subclasses, tracing) still sees the registered op, and both
routes compute the same values and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import affectkit.ops as ops
from affectkit.ops._bridge import call_direct_or_op


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(gen, requires_grad):
    q, k, v = (torch.randn(3, 2, L, 5, generator=gen, dtype=torch.float64, requires_grad=requires_grad)
               for L in (4, 7, 7))
    return q, k, v, torch.tensor([7, 2, 0])


def _run(q, k, v, lengths, mode=None):
    if mode is None:
        out = ops.cross_modal_attention(q, k, v, kv_lengths=lengths, causal=True)
    else:
        with mode:
            out = ops.cross_modal_attention(q, k, v, kv_lengths=lengths, causal=True)
    if not q.requires_grad:
        return (out,)
    g = torch.ones_like(out)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def test_route_choice():
    impl, op, fn = (lambda *a: "impl"), (lambda *a: "op"), type("F", (), {"apply": staticmethod(lambda *a: "function")})
    x = torch.ones(2)
    assert call_direct_or_op(impl, op, x, 3) == "impl"
    assert call_direct_or_op(impl, op, x.requires_grad_(), function=fn) == "function"
    assert call_direct_or_op(impl, op, x) == "op"  # needs autograd and has no Function: the op
    with torch.no_grad():
        assert call_direct_or_op(impl, op, x) == "impl"
    with _Recorder():
        assert call_direct_or_op(impl, op, torch.ones(2)) == "op"
    assert call_direct_or_op(impl, op, torch.nn.Parameter(torch.ones(2)), function=fn) == "op"  # a subclass


def test_both_routes_give_identical_values_and_gradients(gen):
    for requires_grad in (False, True):
        args = _inputs(gen, requires_grad)
        direct = _run(*args)
        recorder = _Recorder()
        dispatched = _run(*args, mode=recorder)
        assert "affectkit.cross_modal_attention.default" in recorder.ops
        for a, b in zip(direct, dispatched):
            assert torch.equal(a, b)
        assert len(direct) == (4 if requires_grad else 1)


def test_fast_path_gradcheck_and_compile_still_use_the_op(gen):
    q, k, v, lengths = _inputs(gen, True)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=lengths), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=lengths), fullgraph=True,
                             backend="aot_eager")
    got = compiled(q, k, v)
    assert torch.equal(got, ops.cross_modal_attention(q, k, v, kv_lengths=lengths))


def test_jit_trace_records_the_op(gen):
    q, k, v, lengths = _inputs(gen, False)
    with torch.no_grad():
        traced = torch.jit.trace(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=lengths), (q, k, v),
                                 check_trace=False)
    assert "affectkit::cross_modal_attention" in str(traced.graph)
    q2, k2, v2, _ = _inputs(gen, False)  # new values: a trace that baked in the result would fail
    assert torch.equal(traced(q2, k2, v2), ops.cross_modal_attention(q2, k2, v2, kv_lengths=lengths))


def _graph_step(gen, requires_grad):
    x, A, W, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=requires_grad)
                  for shape in ((4, 2, 5, 3), (5, 5), (3, 7), (7,)))
    return lambda: ops.graph_conv(x, A, W, b, "tanh"), (x, A, W, b)


def _pool_step(gen, requires_grad):
    x = torch.randn(5, 9, 4, generator=gen, dtype=torch.float64, requires_grad=requires_grad)
    return lambda: ops.masked_mean(x, torch.tensor([9, 0, 3, 1, 5])), (x,)


def _cheb_step(gen, requires_grad):
    x, L, C = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=requires_grad)
               for shape in ((6, 5, 3), (5, 5), (3, 3, 2)))
    return lambda: ops.cheb_graph_conv(x, L, C), (x, L, C)


@pytest.mark.parametrize("make", [_graph_step, _pool_step, _cheb_step], ids=["graph_conv", "masked_mean", "cheb"])
def test_other_ops_both_routes_identical(make, gen):
    for requires_grad in (False, True):
        fn, leaves = make(gen, requires_grad)
        results = []
        for mode in (None, _Recorder()):
            if mode is None:
                out = fn()
            else:
                with mode:
                    out = fn()
                assert any(name.startswith("affectkit.") for name in mode.ops)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out)) if requires_grad else ()
            results.append((out, *grads))
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_function_route_gradcheck_and_double_backward(gen):
    # Eager calls with grad take the autograd.Function route: check its gradients directly,
    # and that masked_mean's double backward still works through it.
    x, A, W, b = (torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
                  for shape in ((3, 4, 2), (4, 4), (2, 3), (3,)))
    assert torch.autograd.gradcheck(lambda *t: ops.graph_conv(*t, "elu"), (x, A, W, b))
    L, C = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True), \
        torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.cheb_graph_conv, (x, L, C))
    y = torch.randn(3, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 0, 2])
    assert torch.autograd.gradgradcheck(lambda t: ops.masked_mean(t, lengths), (y,))


def test_graph_ops_on_3d_inputs_record_no_view_nodes(gen):
    # (S, N, F) inputs are what the kernels take: a reshape to the same shape would still add
    # a view node before and after the op (about 28 us of autograd work per call).
    x = torch.randn(6, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    A, W, b = torch.rand(5, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    assignment = torch.tensor([0, 0, 1, 1, 1])
    scores = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    L, C = torch.rand(5, 5, dtype=torch.float64), torch.randn(3, 3, 2, dtype=torch.float64)
    outs = {"graph_conv": ops.graph_conv(x, A, W, b, "relu"),
            "hierarchical_pool": ops.hierarchical_pool(x, assignment, scores),
            "cheb_graph_conv": ops.cheb_graph_conv(x, L, C),
            **dict(zip(("graph_conv_pool node", "graph_conv_pool pooled"),
                       ops.graph_conv_pool(x, A, assignment, W, b, "relu", scores)))}
    for name, out in outs.items():
        node = out.grad_fn
        assert "View" not in type(node).__name__, name
        inputs = [f for f, _ in node.next_functions if f is not None]
        assert inputs and all(type(f).__name__ == "AccumulateGrad" for f in inputs), (name, inputs)
    # 4-D inputs are still flattened and restored.
    x4 = x.detach().reshape(2, 3, 5, 3).requires_grad_()
    assert ops.graph_conv(x4, A, W, b).shape == (2, 3, 5, 4)
