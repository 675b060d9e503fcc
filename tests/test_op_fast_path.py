"""Eager calls skip the custom-op dispatcher (ops._bridge.call_direct_or_op); anything that
needs the dispatcher (modes, subclasses, tracing) still sees the registered op, and both
routes compute the same values and gradients."""

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
