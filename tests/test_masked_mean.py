"""affectkit.ops.masked_mean: the op that proves the plumbing (and a real pooling utility)."""

import pytest
import torch

import affectkit.ops as ops
from affectkit.selfcheck import rel_error

from _support import requires_cuda


def reference(x, lengths):
    x = x.double()
    mask = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths.to(x.device)[:, None, None]
    return (x * mask).sum(1) / lengths.to(x.device).clamp(min=1)[:, None].double()


SHAPES = [(1, 1, 1), (2, 3, 5), (7, 13, 37), (3, 1, 257), (11, 97, 1), (0, 5, 3), (4, 0, 6), (5, 6, 0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(shape, dtype, gen):
    B, L, F = shape
    x = torch.randn(B, L, F, generator=gen, dtype=dtype)
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    if B:
        lengths[0] = 0  # an empty sequence gives zeros, never NaN
    got = ops.masked_mean(x, lengths)
    assert got.shape == (B, F) and got.dtype == dtype
    want = reference(x, lengths)
    assert torch.isfinite(got).all()
    assert rel_error(got, want) <= (2e-5 if dtype == torch.float32 else 1e-12)
    if B and F:
        assert (got[0] == 0).all()


def test_non_contiguous_input_and_int32_lengths(gen):
    base = torch.randn(6, 40, 9, generator=gen, dtype=torch.float64)
    x = base.transpose(0, 1)[:, ::2]  # (40, 3, 9) view with odd strides
    lengths = torch.tensor([1, 3, 0] * 13 + [2], dtype=torch.int32)
    assert not x.is_contiguous()
    assert rel_error(ops.masked_mean(x, lengths), reference(x, lengths)) <= 1e-12


def test_kernel_writes_every_output_element(gen):
    # Poison the output buffer the kernel writes into: an unwritten element stays NaN.
    import affectkit._C as C
    from affectkit.ops._bridge import ptr

    x = torch.randn(9, 17, 300, generator=gen)
    lengths = torch.randint(0, 18, (9,), generator=gen)
    lengths[3] = 0
    out = torch.full((9, 300), float("nan"))
    C.masked_mean_forward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], ptr(x), ptr(lengths), ptr(out), 9, 17, 300)
    assert rel_error(out, reference(x, lengths)) <= 2e-5
    grad_x = torch.full((9, 17, 300), float("nan"))
    C.masked_mean_backward(C.DEVICE_CPU, C.DTYPE_CODES["float32"], ptr(out), ptr(lengths), ptr(grad_x), 9, 17, 300)
    x_ref = x.double().requires_grad_()
    reference(x_ref, lengths).backward(out.double())
    assert rel_error(grad_x, x_ref.grad) <= 2e-5


def test_gradcheck_and_gradgradcheck(gen):
    x = torch.randn(4, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([0, 1, 7, 4])
    assert torch.autograd.gradcheck(lambda t: ops.masked_mean(t, lengths), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.masked_mean(t, lengths), (x,))


def test_gradient_zero_past_length(gen):
    x = torch.randn(3, 5, 4, generator=gen, requires_grad=True)
    lengths = torch.tensor([0, 2, 5])
    ops.masked_mean(x, lengths).sum().backward()
    assert (x.grad[0] == 0).all() and (x.grad[1, 2:] == 0).all()
    torch.testing.assert_close(x.grad[1, :2], torch.full((2, 4), 0.5))


def test_opcheck(gen):
    x = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 0, 6])
    torch.library.opcheck(torch.ops.affectkit.masked_mean.default, (x, lengths))
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.affectkit.masked_mean_backward.default, (g, lengths, 6))


def _compiled_step(backend):
    torch._dynamo.reset()

    def step(x, lengths):
        y = ops.masked_mean(x, lengths)
        return (y * y).sum()

    return torch.compile(step, backend=backend, fullgraph=True, dynamic=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(backend, gen):
    step = _compiled_step(backend)
    for B, L, F in [(3, 5, 4), (6, 11, 9)]:  # two shapes: dynamic, no recompile per size
        x = torch.randn(B, L, F, generator=gen, requires_grad=True)
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
        loss = step(x, lengths)
        loss.backward()
        x_ref = x.detach().double().requires_grad_()
        loss_ref = (reference(x_ref, lengths) ** 2).sum()
        loss_ref.backward()
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
        assert rel_error(x.grad, x_ref.grad) <= 2e-5


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ([1.0], torch.tensor([1])), TypeError, r"x: expected a torch.Tensor, got list"),
        (lambda: (torch.zeros(2, 3), torch.tensor([1, 1])), ValueError, r"x: expected a 3-D tensor, got shape \(2, 3\)"),
        (lambda: (torch.zeros(2, 3, 4, dtype=torch.int64), torch.tensor([1, 1])), TypeError, r"x: expected dtype float32, float64, got int64"),
        (lambda: (torch.zeros(2, 3, 4), torch.tensor([1.0, 1.0])), TypeError, r"lengths: expected dtype int32, int64, got float32"),
        (lambda: (torch.zeros(2, 3, 4), torch.tensor([1, 1, 1])), ValueError, r"lengths: expected 2 entries \(x.shape\[0\]\), got 3"),
        (lambda: (torch.zeros(2, 3, 4), torch.tensor([1, 4])), ValueError, r"lengths: expected values in \[0, 3\]"),
        (lambda: (torch.zeros(2, 3, 4), torch.tensor([-1, 0])), ValueError, r"lengths: expected values in \[0, 3\]"),
        (lambda: (torch.zeros(2, 3, 4), torch.tensor([[1, 1]])), ValueError, r"lengths: expected a 1-D tensor"),
    ],
)
def test_bad_input_raises_clear_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.masked_mean(*make())


def test_cuda_lengths_check_on_the_host():
    # The helper the CUDA path uses (the CPU core checks values itself): plain torch, one read
    # back, so it runs on CPU tensors here.
    from affectkit.ops._bridge import check_lengths_range

    check_lengths_range("lengths", torch.tensor([0, 3, 2]), 3)
    check_lengths_range("lengths", torch.tensor([], dtype=torch.int64), 0)
    for bad, got in (([1, 4], 4), ([-2, 3], -2)):
        with pytest.raises(ValueError, match=rf"lengths: expected values in \[0, 3\], got {got}$"):
            check_lengths_range("lengths", torch.tensor(bad), 3)


@requires_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 33, 37), (64, 7, 768), (3, 1000, 6), (0, 4, 4)])
def test_cuda_matches_reference(dtype, tol, shape, gen):
    B, L, F = shape
    x = torch.randn(B, L, F, generator=gen).to("cuda", dtype)
    lengths = torch.randint(0, L + 1, (B,), generator=gen).cuda()
    got = ops.masked_mean(x, lengths)
    assert rel_error(got.cpu(), reference(x.cpu(), lengths.cpu())) <= tol
    xr = x.detach().requires_grad_()
    ops.masked_mean(xr, lengths).float().sum().backward()
    xc = x.detach().cpu().double().requires_grad_()
    reference(xc, lengths.cpu()).sum().backward()
    assert rel_error(xr.grad.cpu(), xc.grad) <= tol


@requires_cuda
def test_cuda_runs_on_current_stream_and_checks_lengths(gen):
    x = torch.randn(8, 50, 64, generator=gen).cuda()
    lengths = torch.randint(1, 51, (8,), generator=gen).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = ops.masked_mean(x, lengths)
    stream.synchronize()
    assert rel_error(got.cpu(), reference(x.cpu(), lengths.cpu())) <= 2e-5
    with pytest.raises(ValueError, match="lengths"):
        ops.masked_mean(x, torch.full((8,), 51, device="cuda"))
    with pytest.raises(ValueError, match="lengths: expected a tensor on cuda"):
        ops.masked_mean(x, lengths.cpu())


@requires_cuda
def test_cuda_opcheck_and_compile(gen):
    x = torch.randn(3, 6, 5, generator=gen).cuda().requires_grad_()
    lengths = torch.tensor([2, 0, 6], device="cuda")
    torch.library.opcheck(torch.ops.affectkit.masked_mean.default, (x, lengths))
    step = _compiled_step("inductor")
    step(x, lengths).backward()
    assert torch.isfinite(x.grad).all()
