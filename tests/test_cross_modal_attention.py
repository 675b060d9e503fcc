"""affectkit.ops.cross_modal_attention (+ varlen): against a float64 softmax(QK^T)V reference."""

import math

import pytest
import torch

import affectkit.ops as ops
from affectkit.selfcheck import rel_error

from _support import cuda_synchronisations, requires_cuda

TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 5e-5, torch.float64: 1e-11, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def reference(q, k, v, kv_lengths=None, q_lengths=None, attn_mask=None, causal=False, scale=None):
    """Plain float64 softmax(scale q k^T + masks) v; rows with no visible key and rows past
    q_lengths are zeros."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if kv_lengths is not None:
        allowed = allowed & (j < kv_lengths.to(q.device)[:, None, None, None])
    if causal:
        allowed = allowed & (j <= i + (Lk - Lq))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.double()
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True) if Lk else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))
    out = p @ v
    if q_lengths is not None:
        out = out * (torch.arange(Lq, device=q.device)[None, None, :, None] < q_lengths.to(q.device)[:, None, None, None])
    return out


def _inputs(gen, B, H, Lq, Lk, D, Dv, dtype=torch.float32):
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, Lk, Dv, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


def _check_against_reference(gen, q, k, v, **kw):
    tol, gtol = TOL[q.dtype], GRAD_TOL[q.dtype]
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    got = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g.to(q.device, q.dtype))
    want = _grads(lambda a, b, c: reference(a, b, c, **kw), q.double(), k.double(), v.double(), g.to(q.device))
    assert torch.isfinite(got[0]).all()
    assert got[0].dtype == q.dtype and got[0].shape == want[0].shape
    if q.dtype in (torch.float16, torch.bfloat16):
        # The output is a weighted sum of v's rows, and half-precision weights err relative to
        # sum_j p_ij |v_j|, not to |o_i|: with few keys the sum can cancel (bf16, D = 1, three
        # keys: ~1 % of random draws exceed 1e-2 relative to ||O|| under exact bf16 arithmetic
        # emulated, none exceeds 5e-3 relative to ||P |V|||). A wrong key or weight still errs
        # O(1) here. float32 and float64 keep the plain relative error.
        magnitude = torch.linalg.vector_norm(reference(q.double(), k.double(), v.double().abs(), **kw)).item()
        err = torch.linalg.vector_norm(got[0].double() - want[0]).item()
        assert err <= tol * magnitude or err == 0
    else:
        assert rel_error(got[0], want[0]) <= tol
    # Gradients err relative to the larger of their own norm and the root-sum-square of the
    # terms they sum: dS = P (dO . v - delta) cancels through near-one-hot rows, and exactly
    # (up to rounding) with a single key. In a float64 emulation of the CUDA kernels' rounding
    # points, ~5 % of runs of the bf16 17 x 70, D = 1 case exceed 2e-2 relative to ||grad||,
    # none 9e-3 relative to the terms; float32 with one key (17 x 1, Dv = 200) reached 5.005e-5
    # against 5e-5 at the baseline SIMD level. A dropped key, an lse off by 0.05 or an
    # unnormalised P still err above 2e-2 relative to either on every run.
    magnitudes = _grad_magnitudes(q, k, v, g, **kw)
    for name, a, b, mag in zip(("q", "k", "v"), got[1:], want[1:], magnitudes):
        assert torch.isfinite(a).all(), name
        err = torch.linalg.vector_norm(a.double() - b).item()
        scale = max(torch.linalg.vector_norm(b).item(), torch.linalg.vector_norm(mag).item())
        assert err <= gtol * scale or err == 0, (name, err, scale)


def _grad_magnitudes(q, k, v, g, **kw):
    """The root-sum-square of the terms each of dQ, dK, dV sums (float64), the scale that
    rounding errors grow with. P is reference(q, k, I), so every mask, length
    and causal rule is the reference's own."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double().to(q.device)
    B, H, _, D = q.shape
    Lk = k.shape[2]
    scale = abs(1.0 / math.sqrt(D) if kw.get("scale") is None else kw["scale"])
    p = reference(q, k, torch.eye(Lk, dtype=torch.float64, device=q.device).expand(B, H, Lk, Lk), **kw)
    dp = g @ v.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    terms2 = (p * (dp.abs() + delta.abs())) ** 2  # squared sizes of dS's two terms
    return ((terms2 @ (k * k)).sqrt() * scale, (terms2.transpose(-1, -2) @ (q * q)).sqrt() * scale,
            ((p * p).transpose(-1, -2) @ (g * g)).sqrt())


SHAPES = [  # B, H, Lq, Lk, D, Dv
    (1, 1, 1, 1, 1, 1),
    (2, 3, 5, 7, 6, 6),
    (3, 2, 33, 33, 64, 64),
    (2, 2, 50, 97, 32, 32),
    (1, 2, 67, 31, 13, 5),
    (2, 1, 130, 65, 128, 128),
    (1, 1, 3, 40, 256, 256),
    (1, 2, 17, 1, 7, 200),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lengths_and_causal_match_reference(shape, dtype, gen):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = _inputs(gen, *shape, dtype=dtype)
    kv_lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
    q_lengths = torch.randint(0, Lq + 1, (B,), generator=gen)
    kv_lengths[0] = 0 if B > 1 else kv_lengths[0]  # an empty key set: zeros, never NaN
    for causal in (False, True):
        _check_against_reference(gen, q, k, v, causal=causal)
        _check_against_reference(gen, q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, causal=causal)


@pytest.mark.parametrize("kind", ["bool_full", "bool_bh", "bool_row", "add_full", "add_key", "add_neg_inf"])
def test_every_mask_kind(kind, gen):
    B, H, Lq, Lk = 3, 4, 37, 45
    q, k, v = _inputs(gen, B, H, Lq, Lk, 24, 40)
    if kind == "bool_full":
        mask = torch.rand(B, H, Lq, Lk, generator=gen) > 0.4
        mask[0, 1, 5] = False  # a fully masked row
    elif kind == "bool_bh":
        mask = torch.rand(B, 1, 1, Lk, generator=gen) > 0.3
    elif kind == "bool_row":
        mask = torch.rand(Lq, Lk, generator=gen) > 0.5
    elif kind == "add_full":
        mask = torch.randn(B, H, Lq, Lk, generator=gen)
    elif kind == "add_key":
        mask = torch.randn(B, 1, 1, Lk, generator=gen, dtype=torch.float64)
    else:
        mask = torch.where(torch.rand(H, 1, Lk, generator=gen) > 0.5, 0.0, float("-inf"))
        mask[1] = float("-inf")  # every key of head 1 masked
    kv_lengths = torch.randint(1, Lk + 1, (B,), generator=gen)
    _check_against_reference(gen, q, k, v, attn_mask=mask)
    _check_against_reference(gen, q, k, v, attn_mask=mask, kv_lengths=kv_lengths, causal=True, scale=0.3)


@pytest.mark.parametrize("Lq", [1, 2, 4, 66])
@pytest.mark.parametrize("Lk", [1, 70, 300])
def test_few_query_rows_match_reference(Lq, Lk, gen):
    """Tiles of at most 4 query rows (decoding; the last 2 rows of Lq = 66) take the key-major
    forward: no mask, every mask kind, causal with lengths, features that are and are not
    whole vectors, float32 and float64."""
    B, H = 2, 3
    for (D, Dv), dtype in zip(((13, 5), (64, 64)), (torch.float32, torch.float64)):
        q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv, dtype=dtype)
        bool_mask = torch.rand(B, H, Lq, Lk, generator=gen) > 0.4
        bool_mask[0, 1, 0] = False  # a fully masked row
        add_mask = torch.randn(B, 1, 1, Lk, generator=gen)
        kv_lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
        q_lengths = torch.randint(0, Lq + 1, (B,), generator=gen)
        for kw in ({}, {"attn_mask": bool_mask}, {"attn_mask": add_mask, "scale": 0.3},
                   {"kv_lengths": kv_lengths, "q_lengths": q_lengths, "causal": True},
                   {"causal": True, "attn_mask": bool_mask}):
            _check_against_reference(gen, q, k, v, **kw)


def test_few_query_rows_dropout_is_that_of_the_weights(gen):
    # The key-major forward drops the probabilities the weights kernel reports: out = W v.
    q, k, v = _inputs(gen, 2, 1, 2, 90, 16, 16, dtype=torch.float64)
    kw = dict(dropout_p=0.3, kv_lengths=torch.tensor([90, 40]))
    torch.manual_seed(3)
    out, w = ops.cross_modal_attention(q, k, v, need_weights=True, **kw)
    assert rel_error(out[:, 0], w @ v[:, 0]) <= 1e-12
    assert 0.55 < ((w > 0).sum() / (2 * (90 + 40))).item() < 0.85  # about 1 - p of the visible kept
    kw["causal"] = True
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: (torch.manual_seed(5), ops.cross_modal_attention(a, b, c, **kw))[1], (qq, kk, vv))


def test_fully_masked_rows_give_zeros_and_zero_grads(gen):
    q, k, v = _inputs(gen, 2, 2, 9, 11, 8, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.ones(2, 2, 9, 11, dtype=torch.bool)
    mask[0, 0, 3] = False
    out = ops.cross_modal_attention(q, k, v, attn_mask=mask, kv_lengths=torch.tensor([0, 11]),
                                    q_lengths=torch.tensor([9, 4]))
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :, 4:] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all() and (q.grad[1, :, 4:] == 0).all()
    assert (k.grad[0] == 0).all() and (v.grad[0] == 0).all()


def test_non_contiguous_inputs(gen):
    base = torch.randn(3, 21, 4, 2, 16, generator=gen, dtype=torch.float64)
    q = base[..., 0, :].transpose(1, 2)  # (3, 4, 21, 16) from a (B, L, H, D) layout
    kv = torch.randn(3, 30, 4, 48, generator=gen, dtype=torch.float64)
    k = kv[..., :16].transpose(1, 2)
    v = kv[..., 16::2].transpose(1, 2)  # feature stride 2: copied
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = (torch.rand(3, 30, 4, generator=gen) > 0.3).permute(0, 2, 1)[:, :, None, :]
    _check_against_reference(gen, q, k, v, attn_mask=mask, kv_lengths=torch.tensor([30, 1, 17]))


def test_empty_sizes(gen):
    for shape in [(0, 2, 3, 4, 5, 6), (2, 0, 3, 4, 5, 6), (2, 2, 0, 4, 5, 6), (2, 2, 3, 0, 5, 6)]:
        q, k, v = _inputs(gen, *shape)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = ops.cross_modal_attention(q, k, v)
        assert out.shape == shape[:3] + (shape[5],)
        assert (out == 0).all()
        out.sum().backward()
        assert k.grad.shape == k.shape and (k.grad == 0).all()


def test_kernel_writes_every_output_element(gen):
    # Poison the buffers the core writes into: an unwritten element stays NaN.
    import affectkit._C as C
    from affectkit.ops._bridge import ptr

    B, H, Lq, Lk, D, Dv = 3, 2, 70, 41, 10, 9
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv)
    kv_lengths = torch.tensor([41, 0, 5])
    q_lengths = torch.tensor([70, 12, 0])
    out = torch.full((B, H, Lq, Dv), float("nan"))
    lse = torch.full((B, H, Lq), float("nan"))
    f32 = C.DTYPE_CODES["float32"]
    view = lambda t: (ptr(t), t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    dims, index = (B, H, Lq, Lk, D, Dv), (ptr(q_lengths), ptr(kv_lengths), 0, 0, 0, 0)
    no_mask = (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    C.attention_forward(C.DEVICE_CPU, f32, dims, index, False, 0.25, 0.0, 0, view(q), view(k), view(v), no_mask,
                        view(out), view(lse))
    want = reference(q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, scale=0.25)
    assert rel_error(out, want) <= 2e-5
    g = torch.randn(B, H, Lq, Dv, generator=gen)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    C.attention_backward(C.DEVICE_CPU, f32, dims, index, False, 0.25, 0.0, 0, view(q), view(k), view(v), no_mask,
                         view(out), view(g), view(lse), *(view(t) for t in grads))
    want = _grads(lambda a, b, c: reference(a, b, c, kv_lengths=kv_lengths, q_lengths=q_lengths, scale=0.25),
                  q.double(), k.double(), v.double(), g.double())
    for a, b in zip(grads, want[1:]):
        assert rel_error(a, b) <= 5e-5
    weights = torch.full((B, Lq, Lk), float("nan"))
    C.attention_weights(C.DEVICE_CPU, f32, dims, index, False, 0.25, 0.0, 0, view(q), view(k), no_mask, view(lse),
                        ptr(weights))
    assert torch.isfinite(weights).all()


def _reference_weights(q, k, **kw):
    # Probabilities = the reference applied to one-hot values.
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    eye = torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk)
    return reference(q, k, eye, **kw).mean(1)


def test_need_weights_returns_head_averaged_probabilities(gen):
    q, k, v = _inputs(gen, 3, 5, 20, 75, 16, 16)
    kw = dict(kv_lengths=torch.tensor([75, 3, 0]), q_lengths=torch.tensor([20, 7, 20]), causal=True,
              attn_mask=torch.rand(3, 1, 20, 75, generator=gen) > 0.2)
    out, w = ops.cross_modal_attention(q, k, v, need_weights=True, **kw)
    assert w.shape == (3, 20, 75)
    assert rel_error(out, reference(q, k, v, **kw)) <= 2e-5
    assert rel_error(w, _reference_weights(q, k, **kw)) <= 2e-5
    out_h, w_h = ops.cross_modal_attention(q, k, v, need_weights="per_head", **kw)
    assert torch.equal(out_h, out) and w_h.shape == (3, 5, 20, 75)
    eye = torch.eye(75, dtype=torch.float64).expand(3, 5, 75, 75)
    assert rel_error(w_h, reference(q, k, eye, **kw)) <= 2e-5
    with pytest.raises(ValueError, match="need_weights: expected False, True or 'per_head', got 'mean'"):
        ops.cross_modal_attention(q, k, v, need_weights="mean")


def test_gradcheck_float64(gen):
    q, k, v = _inputs(gen, 2, 2, 5, 7, 3, 4, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    kw = dict(kv_lengths=torch.tensor([7, 4]), q_lengths=torch.tensor([3, 5]), attn_mask=mask, causal=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), (q, k, v))
    add = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.cross_modal_attention(a, b, c, attn_mask=add, scale=0.7),
                                    (q, k, v))


def test_backward_is_deterministic(gen):
    q, k, v = _inputs(gen, 4, 3, 90, 77, 32, 32)
    g = torch.randn(4, 3, 90, 32, generator=gen)
    kw = dict(kv_lengths=torch.tensor([77, 50, 1, 33]), dropout_p=0.2)
    runs = []
    for _ in range(3):
        torch.manual_seed(1234)
        runs.append(_grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_backward_is_bit_identical_across_thread_counts(gen):
    import affectkit._C as C

    q, k, v = _inputs(gen, 3, 5, 70, 45, 16, 24)
    g = torch.randn(3, 5, 70, 24, generator=gen)
    kw = dict(kv_lengths=torch.tensor([45, 20, 3]), causal=True)
    before = C.num_threads()
    try:
        C.set_num_threads(1)
        one = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g)
        C.set_num_threads(2)
        two = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g)
    finally:
        C.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_packed_kernel_writes_every_output_row(gen):
    # Packed form through the core directly, buffers poisoned: every row must be written.
    import affectkit._C as C
    from affectkit.ops._bridge import ptr

    lq, lk = torch.tensor([5, 0, 70, 1]), torch.tensor([9, 4, 0, 33])
    H, D, Dv = 3, 7, 20
    q = torch.randn(int(lq.sum()), H, D, generator=gen)
    k = torch.randn(int(lk.sum()), H, D, generator=gen)
    v = torch.randn(int(lk.sum()), H, Dv, generator=gen)
    cu_q, cu_k = _cu(lq), _cu(lk)
    out = torch.full((q.shape[0], H, Dv), float("nan"))
    lse = torch.full((q.shape[0], H), float("nan"))
    view = lambda t: (ptr(t), 0, t.stride(1), t.stride(0))  # noqa: E731
    dims = (4, H, 70, 33, D, Dv)
    index = (0, 0, ptr(cu_q), ptr(cu_k), q.shape[0], k.shape[0])
    no_mask = (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    f32 = C.DTYPE_CODES["float32"]
    C.attention_forward(C.DEVICE_CPU, f32, dims, index, True, 0.3, 0.0, 0, view(q), view(k), view(v), no_mask,
                        view(out), view(lse))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    want = ops.cross_modal_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 70, 33, causal=True,
                                            scale=0.3)
    assert rel_error(out, want) <= 2e-5
    g = torch.randn(out.shape, generator=gen)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    C.attention_backward(C.DEVICE_CPU, f32, dims, index, True, 0.3, 0.0, 0, view(q), view(k), view(v), no_mask,
                         view(out), view(g), (ptr(lse), 0, lse.stride(1), lse.stride(0)), *(view(t) for t in grads))
    for t in grads:
        assert torch.isfinite(t).all()


def test_dropout_is_reproducible_and_consistent(gen):
    q, k, v = _inputs(gen, 2, 3, 19, 23, 8, 8, dtype=torch.float64)
    kw = dict(dropout_p=0.3, kv_lengths=torch.tensor([23, 9]))
    torch.manual_seed(7)
    out1, w1 = ops.cross_modal_attention(q, k, v, need_weights=True, **kw)
    torch.manual_seed(7)
    out2 = ops.cross_modal_attention(q, k, v, **kw)
    assert torch.equal(out1, out2)
    out3 = ops.cross_modal_attention(q, k, v, **kw)
    assert not torch.equal(out1, out3)
    # With one head the weights are that head's dropped probabilities: out = W v exactly.
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    torch.manual_seed(3)
    out, w = ops.cross_modal_attention(q1, k1, v1, need_weights=True, **kw)
    assert rel_error(out[:, 0], w @ v1[:, 0].double()) <= 1e-12
    kept = (w > 0).double().sum() / (_reference_weights(q1, k1, kv_lengths=kw["kv_lengths"]) > 0).double().sum()
    assert 0.55 < kept.item() < 0.85  # about 1 - p of the visible probabilities survive
    # Gradients agree with the reference given the same dropped probabilities (as a mask).
    torch.manual_seed(11)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q1, k1, v1))
    assert torch.autograd.gradcheck(
        lambda a, b, c: (torch.manual_seed(11), ops.cross_modal_attention(a, b, c, **kw))[1], (qq, kk, vv))


def _pack(x, lengths):
    return torch.cat([x[b, :, : int(n)].transpose(0, 1) for b, n in enumerate(lengths)], 0)


def _cu(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_padded(causal, gen):
    B, H, D, Dv = 5, 3, 12, 20
    lq = torch.tensor([1, 33, 0, 17, 6])
    lk = torch.tensor([4, 30, 5, 0, 60])
    Lq, Lk = 40, 64
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv, dtype=torch.float64)
    qp, kp, vp = _pack(q, lq), _pack(k, lk), _pack(v, lk)
    qp, kp, vp = (t.requires_grad_() for t in (qp, kp, vp))
    out, w = ops.cross_modal_attention_varlen(qp, kp, vp, _cu(lq), _cu(lk), Lq, Lk, causal=causal, need_weights=True)
    assert out.shape == (int(lq.sum()), H, Dv)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(g)
    # Per sequence, the reference on exactly that sequence (causal alignment is per sequence).
    row_q = row_k = 0
    for b in range(B):
        nq, nk = int(lq[b]), int(lk[b])
        qb, kb, vb = (t[row : row + n].transpose(0, 1)[None].detach().requires_grad_()
                      for t, row, n in ((qp, row_q, nq), (kp, row_k, nk), (vp, row_k, nk)))
        want = reference(qb, kb, vb, causal=causal)
        torch.testing.assert_close(out[row_q : row_q + nq].transpose(0, 1)[None], want, rtol=1e-10, atol=1e-12)
        want.backward(g[row_q : row_q + nq].transpose(0, 1)[None])
        for got, ref_t in ((qp.grad[row_q : row_q + nq], qb), (kp.grad[row_k : row_k + nk], kb), (vp.grad[row_k : row_k + nk], vb)):
            torch.testing.assert_close(got.transpose(0, 1)[None], ref_t.grad, rtol=1e-9, atol=1e-11)
        wb = _reference_weights(qb.detach(), kb.detach(), causal=causal)
        torch.testing.assert_close(w[b, :nq, :nk], wb[0], rtol=1e-10, atol=1e-12)
        assert (w[b, nq:] == 0).all() and (w[b, :, nk:] == 0).all()
        row_q += nq
        row_k += nk


def test_varlen_gradcheck_and_mask(gen):
    lq, lk = torch.tensor([3, 0, 4]), torch.tensor([2, 5, 5])
    q = torch.randn(7, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(12, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 1, 4, 5, generator=gen) > 0.3
    fn = lambda a, b, c: ops.cross_modal_attention_varlen(a, b, c, _cu(lq), _cu(lk).int(), 4, 5, attn_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck(gen):
    q, k, v = _inputs(gen, 2, 3, 5, 7, 4, 6, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kvl, ql = torch.tensor([7, 2]), torch.tensor([1, 5])
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    seed = torch.tensor([42])
    op = torch.ops.affectkit.cross_modal_attention.default
    torch.library.opcheck(op, (q, k, v, kvl, ql, None, None, 5, 7, mask, True, 0.5, 0.0, None))
    torch.library.opcheck(op, (q, k, v, None, None, None, None, 5, 7, None, False, 0.5, 0.25, seed))
    out, lse = op(q, k, v, kvl, ql, None, None, 5, 7, mask, True, 0.5, 0.0, None)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # no double backward
    torch.library.opcheck(torch.ops.affectkit.cross_modal_attention_backward.default,
                          (g, qd, kd, vd, out.detach(), lse, kvl, ql, None, None, 5, 7, mask, True, 0.5, 0.0, None))
    torch.library.opcheck(torch.ops.affectkit.cross_modal_attention_weights.default,
                          (q.detach(), k.detach(), lse, kvl, ql, None, None, 5, 7, mask, True, 0.5, 0.0, None))
    qp = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(9, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    vp = torch.randn(9, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op, (qp, kp, vp, None, None, torch.tensor([0, 2, 6]), torch.tensor([0, 8, 9]), 4, 8, None,
                               True, 0.5, 0.0, None))


def _compiled_step(backend):
    torch._dynamo.reset()

    def step(q, k, v, kv_lengths, mask):
        out = ops.cross_modal_attention(q, k, v, kv_lengths=kv_lengths, attn_mask=mask, causal=True)
        return (out * out).sum()

    return torch.compile(step, backend=backend, fullgraph=True, dynamic=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(backend, gen):
    step = _compiled_step(backend)
    for B, H, Lq, Lk, D in [(3, 2, 5, 9, 8), (4, 3, 11, 13, 8)]:  # two shapes: dynamic
        q, k, v = (t.requires_grad_() for t in _inputs(gen, B, H, Lq, Lk, D, D))
        kvl = torch.randint(0, Lk + 1, (B,), generator=gen)
        mask = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2
        loss = step(q, k, v, kvl, mask)
        loss.backward()
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        loss_ref = (reference(qr, kr, vr, kv_lengths=kvl, attn_mask=mask, causal=True) ** 2).sum()
        loss_ref.backward()
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
        for a, b in ((q, qr), (k, kr), (v, vr)):
            assert rel_error(a.grad, b.grad) <= 5e-5


def test_torch_compile_dropout_and_varlen_no_graph_break(gen):
    torch._dynamo.reset()

    def step(q, k, v, cu_q, cu_k):
        out, w = ops.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 6, 7, dropout_p=0.1, need_weights=True)
        return out.sum() + w.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    q = torch.randn(10, 2, 4, generator=gen, requires_grad=True)
    k = torch.randn(12, 2, 4, generator=gen, requires_grad=True)
    v = torch.randn(12, 2, 4, generator=gen, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 6, 10]), torch.tensor([0, 5, 12])
    torch.manual_seed(5)
    compiled(q, k, v, cu_q, cu_k).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


def _bad(**over):
    kw = dict(q=torch.zeros(2, 3, 4, 8), k=torch.zeros(2, 3, 5, 8), v=torch.zeros(2, 3, 5, 6))
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (_bad(q=[1.0]), TypeError, r"q: expected a torch.Tensor, got list"),
        (_bad(q=torch.zeros(2, 4, 8)), ValueError, r"q: expected a 4-D tensor"),
        (_bad(k=torch.zeros(3, 3, 5, 8)), ValueError, r"k: expected \(B, H\) = \(2, 3\)"),
        (_bad(k=torch.zeros(2, 2, 5, 8)), ValueError, r"k: expected \(B, H\) = \(2, 3\)"),
        (_bad(k=torch.zeros(2, 3, 5, 7)), ValueError, r"k: expected head dimension D = 8 \(as q\), got 7"),
        (_bad(v=torch.zeros(2, 3, 4, 6)), ValueError, r"v: expected \(B, H, Lk\) = \(2, 3, 5\)"),
        (_bad(q=torch.zeros(2, 3, 4, 300), k=torch.zeros(2, 3, 5, 300)), ValueError, r"q: expected a head dimension in \[1, 256\], got 300"),
        (_bad(v=torch.zeros(2, 3, 5, 257)), ValueError, r"v: expected a head dimension in \[1, 256\], got 257"),
        (_bad(q=torch.zeros(2, 3, 4, 8, dtype=torch.int64)), TypeError, r"q: expected dtype float32, float64, bfloat16, got int64"),
        (_bad(q=torch.zeros(2, 3, 4, 8, dtype=torch.float16)), TypeError, r"q: expected dtype float32, float64, bfloat16, got float16"),
        (_bad(k=torch.zeros(2, 3, 5, 8, dtype=torch.float64)), TypeError, r"k: expected dtype float32 \(the dtype of q\), got float64"),
        (_bad(kv_lengths=torch.tensor([1, 6])), ValueError, r"kv_lengths: expected values in \[0, 5\], got kv_lengths\[1\] = 6"),
        (_bad(q_lengths=torch.tensor([-1, 2])), ValueError, r"q_lengths: expected values in \[0, 4\], got q_lengths\[0\] = -1"),
        (_bad(kv_lengths=torch.tensor([1, 2, 3])), ValueError, r"kv_lengths: expected 2 entries"),
        (_bad(kv_lengths=torch.tensor([1.0, 2.0])), TypeError, r"kv_lengths: expected dtype int32, int64, got float32"),
        (_bad(kv_lengths=torch.tensor([1, 2], device="meta")), ValueError, r"kv_lengths: expected a tensor on cpu"),
        (_bad(attn_mask=torch.ones(2, 3, 4, 4, dtype=torch.bool)), ValueError, r"attn_mask: expected a shape broadcastable to \(2, 3, 4, 5\)"),
        (_bad(attn_mask=torch.ones(4, 5, dtype=torch.int32)), TypeError, r"attn_mask: expected dtype bool or a floating dtype"),
        (_bad(dropout_p=1.0), ValueError, r"dropout_p: expected a value in \[0, 1\), got 1.0"),
        (_bad(scale=float("inf")), ValueError, r"scale: expected a finite number"),
    ],
)
def test_bad_input_raises_clear_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.cross_modal_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


@pytest.mark.parametrize(
    "cu_q, cu_k, max_q, max_k, match",
    [
        ([0, 2, 5], [0, 4, 9], 2, 5, r"cu_seqlens_q: expected sequences of at most max_seqlen_q = 2 rows, got 3"),
        ([1, 2, 6], [0, 4, 9], 4, 5, r"cu_seqlens_q: expected cu_seqlens_q\[0\] = 0, got 1"),
        ([0, 3, 6], [0, 4, 8], 4, 5, r"cu_seqlens_k: expected the last offset to equal the number of rows \(9\), got 8"),
        ([0, 3, 6], [0, 5, 4], 4, 5, r"cu_seqlens_k: expected non-decreasing offsets"),
        ([0, 3, 6], [0, 9], 4, 9, r"cu_seqlens_k: expected 3 offsets \(as cu_seqlens_q\), got 2"),
    ],
)
def test_varlen_bad_offsets(cu_q, cu_k, max_q, max_k, match):
    q, k, v = torch.zeros(6, 2, 4), torch.zeros(9, 2, 4), torch.zeros(9, 2, 4)
    with pytest.raises(ValueError, match=match):
        ops.cross_modal_attention_varlen(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), max_q, max_k)


def test_core_rejects_bad_values_itself():
    import affectkit._C as C

    f32 = C.DTYPE_CODES["float32"]
    view = (0, 0, 0, 0)
    no_mask = (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"q: expected a head dimension D in \[1, 256\], got 0"):
        C.attention_forward(C.DEVICE_CPU, f32, (1, 1, 1, 1, 0, 1), (0,) * 6, False, 1.0, 0.0, 0, view, view, view,
                            no_mask, view, view)
    with pytest.raises(TypeError, match=r"q: expected dtype float32 or float64 or bfloat16, got int32"):
        C.attention_forward(C.DEVICE_CPU, C.DTYPE_CODES["int32"], (0, 1, 1, 1, 4, 4), (0,) * 6, False, 1.0, 0.0, 0,
                            view, view, view, no_mask, view, view)
    with pytest.raises(TypeError, match=r"attn_mask: expected dtype bool or float32, got float64"):
        C.attention_forward(C.DEVICE_CPU, f32, (0, 1, 1, 1, 4, 4), (0,) * 6, False, 1.0, 0.0, 0, view, view, view,
                            (8, C.DTYPE_CODES["float64"], 0, 0, 0, 0), view, view)
    with pytest.raises(ValueError, match=r"q: expected a valid data pointer"):
        C.attention_forward(C.DEVICE_CPU, f32, (1, 1, 1, 1, 4, 4), (0,) * 6, False, 1.0, 0.0, 0, view, view, view,
                            no_mask, view, view)


# ------------------------------------------------------------- additive mask gradient

MASK_SHAPES = {  # name: shape of the additive mask for (B, H, Lq, Lk)
    "row": lambda B, H, Lq, Lk: (Lq, Lk),
    "key": lambda B, H, Lq, Lk: (B, 1, 1, Lk),
    "head": lambda B, H, Lq, Lk: (1, H, Lq, Lk),
    "head_3d": lambda B, H, Lq, Lk: (H, Lq, Lk),
    "full": lambda B, H, Lq, Lk: (B, H, Lq, Lk),
}


def _additive_mask(gen, shape, dtype, neg_inf=True):
    """A random additive mask with some -inf entries and, when it has more than one row,
    one fully masked row."""
    mask = torch.randn(shape, generator=gen, dtype=torch.float64)
    if neg_inf:
        mask = mask.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("-inf"))
        if shape[-2] > 1:
            mask[..., 1, :] = float("-inf")
    return mask.to(dtype)


def _mask_grads(fn, q, k, v, mask, g):
    q, k, v, mask = (t.detach().requires_grad_() for t in (q, k, v, mask))
    out = fn(q, k, v, mask)
    out.backward(g)
    return out, q.grad, k.grad, v.grad, mask.grad


@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_additive_mask_gradcheck_float64(mask_shape, gen):
    B, H, Lq, Lk = 2, 3, 5, 6
    q, k, v = _inputs(gen, B, H, Lq, Lk, 3, 2, dtype=torch.float64)
    mask = _additive_mask(gen, MASK_SHAPES[mask_shape](B, H, Lq, Lk), torch.float64)
    q, k, v, mask = (t.requires_grad_() for t in (q, k, v, mask))
    for kw in (dict(), dict(kv_lengths=torch.tensor([6, 0]), q_lengths=torch.tensor([4, 5]), causal=True, scale=0.6)):
        fn = lambda a, b, c, m: ops.cross_modal_attention(a, b, c, attn_mask=m, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, mask))
        # Masked-out entries (and keys past the lengths, rows with no key) get exactly zero.
        _, _, _, _, gm = _mask_grads(fn, q, k, v, mask, torch.randn(B, H, Lq, 2, generator=gen, dtype=torch.float64))
        assert torch.isfinite(gm).all() and (gm[mask == float("-inf")] == 0).all()


def test_additive_mask_gradcheck_with_dropout(gen):
    q, k, v = _inputs(gen, 2, 2, 4, 7, 3, 3, dtype=torch.float64)
    mask = _additive_mask(gen, (2, 1, 4, 7), torch.float64)
    kw = dict(dropout_p=0.3, kv_lengths=torch.tensor([7, 3]), causal=True)
    q, k, v, mask = (t.requires_grad_() for t in (q, k, v, mask))
    # The same seed before every call: the same dropout mask in forward and backward.
    fn = lambda a, b, c, m: (torch.manual_seed(21), ops.cross_modal_attention(a, b, c, attn_mask=m, **kw))[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_additive_mask_grad_float32_matches_reference(mask_shape, gen):
    B, H, Lq, Lk, D, Dv = 3, 4, 70, 83, 24, 20  # several tiles each way, ragged edges
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv)
    mask = _additive_mask(gen, MASK_SHAPES[mask_shape](B, H, Lq, Lk), torch.float32)
    g = torch.randn(B, H, Lq, Dv, generator=gen, dtype=torch.float64)
    for kw in (dict(), dict(kv_lengths=torch.tensor([83, 0, 40]), q_lengths=torch.tensor([70, 9, 66]), causal=True)):
        got = _mask_grads(lambda a, b, c, m: ops.cross_modal_attention(a, b, c, attn_mask=m, **kw), q, k, v, mask,
                          g.float())
        want = _mask_grads(lambda a, b, c, m: reference(a, b, c, attn_mask=m, **kw), q.double(), k.double(),
                           v.double(), mask.double(), g)
        assert got[4].shape == mask.shape and got[4].dtype == torch.float32
        assert torch.isfinite(got[4]).all()
        assert rel_error(got[4], want[4]) <= 5e-5
        for a, b in zip(got[:4], want[:4]):
            assert rel_error(a, b) <= 5e-5


def test_additive_mask_grad_other_dtype_and_no_grad(gen):
    # A float64 mask with float32 inputs: its gradient comes back float64; a mask that does
    # not require grad, and a bool mask, get none.
    q, k, v = _inputs(gen, 2, 2, 9, 10, 8, 8)
    mask = torch.randn(9, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    ops.cross_modal_attention(q, k, v, attn_mask=mask).sum().backward()
    assert mask.grad.dtype == torch.float64 and mask.grad.shape == (9, 10) and mask.grad.abs().sum() > 0
    qg = q.clone().requires_grad_()
    const = torch.randn(9, 10, generator=gen)
    ops.cross_modal_attention(qg, k, v, attn_mask=const).sum().backward()
    assert const.grad is None and qg.grad is not None
    bool_mask = torch.rand(9, 10, generator=gen) > 0.3
    with pytest.raises(RuntimeError):
        bool_mask.requires_grad_()
    out, lse = torch.ops.affectkit.cross_modal_attention(q, k, v, None, None, None, None, 9, 10,
                                                         bool_mask[None, None], False, 0.5, 0.0, None)
    with pytest.raises(ValueError, match="mask_grad: expected a 4-D additive float attn_mask to differentiate"):
        torch.ops.affectkit.cross_modal_attention_backward(out, q, k, v, out, lse, None, None, None, None, 9, 10,
                                                           bool_mask[None, None], False, 0.5, 0.0, None, True)


def test_additive_mask_grad_varlen_gradcheck(gen):
    lq, lk = torch.tensor([3, 0, 4]), torch.tensor([2, 5, 5])
    q = torch.randn(7, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(12, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = _additive_mask(gen, (3, 1, 4, 5), torch.float64).requires_grad_()
    fn = lambda a, b, c, m: ops.cross_modal_attention_varlen(a, b, c, _cu(lq), _cu(lk), 4, 5, attn_mask=m,  # noqa: E731
                                                              causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))
    fn(q, k, v, mask).sum().backward()
    assert (mask.grad[0, :, 3:] == 0).all() and (mask.grad[0, :, :, 2:] == 0).all() and (mask.grad[1] == 0).all()


def test_additive_mask_grad_is_bit_identical_across_thread_counts(gen):
    import affectkit._C as C

    q, k, v = _inputs(gen, 3, 5, 70, 45, 16, 24)
    mask = _additive_mask(gen, (3, 1, 70, 45), torch.float32)
    g = torch.randn(3, 5, 70, 24, generator=gen)
    kw = dict(kv_lengths=torch.tensor([45, 20, 3]), causal=True, dropout_p=0.2)
    fn = lambda a, b, c, m: (torch.manual_seed(5), ops.cross_modal_attention(a, b, c, attn_mask=m, **kw))[1]  # noqa: E731
    before = C.num_threads()
    try:
        C.set_num_threads(1)
        one = _mask_grads(fn, q, k, v, mask, g)
        C.set_num_threads(2)
        two = _mask_grads(fn, q, k, v, mask, g)
    finally:
        C.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_kernel_writes_every_mask_grad_element(gen):
    import affectkit._C as C
    from affectkit.ops._bridge import ptr

    B, H, Lq, Lk, D, Dv = 3, 2, 70, 41, 10, 9
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv)
    kv_lengths, q_lengths = torch.tensor([41, 0, 5]), torch.tensor([70, 12, 3])
    mask = _additive_mask(gen, (B, H, Lq, Lk), torch.float32)
    f32 = C.DTYPE_CODES["float32"]
    view = lambda t: (ptr(t), t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    dims, index = (B, H, Lq, Lk, D, Dv), (ptr(q_lengths), ptr(kv_lengths), 0, 0, 0, 0)
    mask_view = (ptr(mask), f32, *mask.stride())
    out, lse = torch.empty(B, H, Lq, Dv), torch.empty(B, H, Lq)
    C.attention_forward(C.DEVICE_CPU, f32, dims, index, True, 0.25, 0.0, 0, view(q), view(k), view(v), mask_view,
                        view(out), view(lse))
    g = torch.randn(B, H, Lq, Dv, generator=gen)
    grads = [torch.empty(t.shape) for t in (q, k, v)]
    grad_mask = torch.full((B, H, Lq, Lk), float("nan"))
    C.attention_backward(C.DEVICE_CPU, f32, dims, index, True, 0.25, 0.0, 0, view(q), view(k), view(v), mask_view,
                         view(out), view(g), view(lse), *(view(t) for t in grads), ptr(grad_mask))
    want = _mask_grads(lambda a, b, c, m: reference(a, b, c, attn_mask=m, kv_lengths=kv_lengths,
                                                    q_lengths=q_lengths, causal=True, scale=0.25),
                       q.double(), k.double(), v.double(), mask.double(), g.double())
    assert torch.isfinite(grad_mask).all()
    assert rel_error(grad_mask, want[4]) <= 5e-5
    assert (grad_mask[1] == 0).all() and (grad_mask[2, :, 3:] == 0).all() and (grad_mask[2, :, :, 5:] == 0).all()
    with pytest.raises(ValueError, match="grad_mask: expected an additive float attn_mask to differentiate, got no mask"):
        C.attention_backward(C.DEVICE_CPU, f32, dims, index, True, 0.25, 0.0, 0, view(q), view(k), view(v),
                             (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0), view(out), view(g), view(lse),
                             *(view(t) for t in grads), ptr(grad_mask))


def test_additive_mask_grad_opcheck(gen):
    q, k, v = _inputs(gen, 2, 3, 5, 7, 4, 6, dtype=torch.float64)
    kvl, ql = torch.tensor([7, 2]), torch.tensor([1, 5])
    mask = _additive_mask(gen, (1, 3, 5, 7), torch.float64)
    op = torch.ops.affectkit.cross_modal_attention.default
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kvl, ql, None, None, 5, 7,
            mask.requires_grad_(), True, 0.5, 0.0, None)
    torch.library.opcheck(op, args)
    out, lse = op(*args)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    bwd = torch.ops.affectkit.cross_modal_attention_backward.default
    for m, want in ((mask.detach(), True), (mask.detach()[:1, :1], True), (mask.detach(), False)):
        torch.library.opcheck(bwd, (g, q.detach(), k.detach(), v.detach(), out.detach(), lse, kvl, ql, None, None,
                                    5, 7, m, True, 0.5, 0.0, None, want))


def test_torch_compile_additive_mask_grad(gen):
    torch._dynamo.reset()

    def step(q, k, v, kv_lengths, mask):
        out = ops.cross_modal_attention(q, k, v, kv_lengths=kv_lengths, attn_mask=mask, causal=True)
        return (out * out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, H, Lq, Lk, D in [(3, 2, 5, 9, 8), (4, 3, 11, 13, 8)]:  # two shapes: dynamic
        q, k, v = (t.requires_grad_() for t in _inputs(gen, B, H, Lq, Lk, D, D))
        kvl = torch.randint(1, Lk + 1, (B,), generator=gen)
        mask = _additive_mask(gen, (B, 1, 1, Lk), torch.float32).requires_grad_()
        compiled(q, k, v, kvl, mask).backward()
        qr, kr, vr, mr = (t.detach().double().requires_grad_() for t in (q, k, v, mask))
        (reference(qr, kr, vr, kv_lengths=kvl, attn_mask=mr, causal=True) ** 2).sum().backward()
        assert mask.grad.shape == mask.shape
        for a, b in ((q, qr), (k, kr), (v, vr), (mask, mr)):
            assert rel_error(a.grad, b.grad) <= 5e-5


# ------------------------------------------------------------------------ bfloat16 on CPU


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_cpu_matches_reference(shape, gen):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = _inputs(gen, *shape, dtype=torch.bfloat16)
    kv_lengths = torch.randint(0, Lk + 1, (B,), generator=gen)
    q_lengths = torch.randint(0, Lq + 1, (B,), generator=gen)
    for causal in (False, True):
        _check_against_reference(gen, q, k, v, causal=causal)
        _check_against_reference(gen, q, k, v, kv_lengths=kv_lengths, q_lengths=q_lengths, causal=causal)


def test_bfloat16_cpu_masks_weights_and_mask_grad(gen):
    B, H, Lq, Lk, D = 3, 4, 37, 45, 32
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, D, dtype=torch.bfloat16)
    kw = dict(kv_lengths=torch.tensor([45, 0, 20]), causal=True)
    _check_against_reference(gen, q, k, v, attn_mask=torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3, **kw)
    mask = _additive_mask(gen, (B, 1, 1, Lk), torch.float32)
    g = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    got = _mask_grads(lambda a, b, c, m: ops.cross_modal_attention(a, b, c, attn_mask=m, **kw), q, k, v, mask,
                      g.bfloat16())
    want = _mask_grads(lambda a, b, c, m: reference(a, b, c, attn_mask=m, **kw), q.double(), k.double(), v.double(),
                       mask.double(), g)
    assert got[0].dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in got[1:4])
    assert got[4].dtype == torch.float32
    assert rel_error(got[0], want[0]) <= TOL[torch.bfloat16]
    for a, b in zip(got[1:], want[1:]):
        assert torch.isfinite(a).all() and rel_error(a, b) <= GRAD_TOL[torch.bfloat16]
    out, w = ops.cross_modal_attention(q, k, v, need_weights=True, **kw)
    assert w.dtype == torch.bfloat16
    assert rel_error(w, _reference_weights(q.double(), k.double(), **kw)) <= TOL[torch.bfloat16]


def test_bfloat16_cpu_non_contiguous_dropout_and_varlen(gen):
    base = torch.randn(2, 19, 3, 2, 16, generator=gen).bfloat16()
    q = base[..., 0, :].transpose(1, 2)  # (2, 3, 19, 16), strided
    k = base[..., 1, :].transpose(1, 2)
    v = base[..., 1, ::2].transpose(1, 2)  # feature stride 2: copied
    _check_against_reference(gen, q, k, v, kv_lengths=torch.tensor([19, 7]))
    # Dropout: the bfloat16 path drops exactly what the float32 path drops for the same seed.
    torch.manual_seed(3)
    got = ops.cross_modal_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    want = ops.cross_modal_attention(q.float(), k.float(), v.float(), dropout_p=0.3)
    assert rel_error(got, want) <= TOL[torch.bfloat16]
    lq, lk = torch.tensor([5, 0, 19]), torch.tensor([19, 7, 1])
    qp = torch.randn(24, 3, 16, generator=gen).bfloat16()
    kp = torch.randn(27, 3, 16, generator=gen).bfloat16()
    vp = torch.randn(27, 3, 8, generator=gen).bfloat16()
    got = ops.cross_modal_attention_varlen(qp, kp, vp, _cu(lq), _cu(lk), 19, 19, causal=True)
    want = ops.cross_modal_attention_varlen(qp.double(), kp.double(), vp.double(), _cu(lq), _cu(lk), 19, 19,
                                            causal=True)
    assert got.dtype == torch.bfloat16 and rel_error(got, want) <= TOL[torch.bfloat16]


def test_bfloat16_cpu_kernel_writes_every_output_element(gen):
    import affectkit._C as C
    from affectkit.ops._bridge import ptr

    B, H, Lq, Lk, D, Dv = 3, 2, 70, 41, 10, 9
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, Dv, dtype=torch.bfloat16)
    kv_lengths, q_lengths = torch.tensor([41, 0, 5]), torch.tensor([70, 12, 0])
    bf16 = C.DTYPE_CODES["bfloat16"]
    view = lambda t: (ptr(t), t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    dims, index = (B, H, Lq, Lk, D, Dv), (ptr(q_lengths), ptr(kv_lengths), 0, 0, 0, 0)
    no_mask = (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    out = torch.full((B, H, Lq, Dv), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((B, H, Lq), float("nan"))
    C.attention_forward(C.DEVICE_CPU, bf16, dims, index, False, 0.25, 0.0, 0, view(q), view(k), view(v), no_mask,
                        view(out), view(lse))
    kw = dict(kv_lengths=kv_lengths, q_lengths=q_lengths, scale=0.25)
    assert rel_error(out, reference(q, k, v, **kw)) <= TOL[torch.bfloat16]
    g = torch.randn(B, H, Lq, Dv, generator=gen).bfloat16()
    grads = [torch.full(t.shape, float("nan"), dtype=torch.bfloat16) for t in (q, k, v)]
    C.attention_backward(C.DEVICE_CPU, bf16, dims, index, False, 0.25, 0.0, 0, view(q), view(k), view(v), no_mask,
                         view(out), view(g), view(lse), *(view(t) for t in grads))
    want = _grads(lambda a, b, c: reference(a, b, c, **kw), q.double(), k.double(), v.double(), g.double())
    for a, b in zip(grads, want[1:]):
        assert torch.isfinite(a).all() and rel_error(a, b) <= GRAD_TOL[torch.bfloat16]
    weights = torch.full((B, Lq, Lk), float("nan"), dtype=torch.bfloat16)
    C.attention_weights(C.DEVICE_CPU, bf16, dims, index, False, 0.25, 0.0, 0, view(q), view(k), no_mask, view(lse),
                        ptr(weights))
    assert torch.isfinite(weights).all()


def test_bfloat16_cpu_opcheck_and_compile(gen):
    q, k, v = (t.requires_grad_() for t in _inputs(gen, 2, 3, 5, 7, 4, 6, dtype=torch.bfloat16))
    torch.library.opcheck(torch.ops.affectkit.cross_modal_attention.default,
                          (q, k, v, torch.tensor([7, 2]), None, None, None, 5, 7, None, True, 0.5, 0.0, None))
    torch._dynamo.reset()
    step = torch.compile(lambda a, b, c: ops.cross_modal_attention(a, b, c, causal=True).float().sum(),
                         backend="aot_eager", fullgraph=True, dynamic=True)
    step(q, k, v).backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


# ------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 33, 33, 64, 64), (2, 2, 50, 375, 32, 32),
                                   (1, 2, 67, 31, 6, 6), (1, 1, 130, 200, 128, 128), (1, 1, 3, 40, 256, 256)])
def test_cuda_matches_reference(dtype, shape, gen):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = (t.cuda() for t in _inputs(gen, *shape, dtype=dtype))
    kvl = torch.randint(0, Lk + 1, (B,), generator=gen).cuda()
    ql = torch.randint(0, Lq + 1, (B,), generator=gen).cuda()
    mask = (torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2).cuda()
    for kw in (dict(), dict(kv_lengths=kvl, q_lengths=ql, causal=True), dict(attn_mask=mask, kv_lengths=kvl)):
        _check_against_reference(gen, q, k, v, **kw)


@requires_cuda
def test_cuda_stream_dropout_weights_varlen_and_determinism(gen):
    q, k, v = (t.cuda() for t in _inputs(gen, 3, 4, 29, 41, 16, 16))
    kvl = torch.tensor([41, 3, 0]).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out, w = ops.cross_modal_attention(q, k, v, kv_lengths=kvl, need_weights=True)
    stream.synchronize()
    assert rel_error(out.cpu(), reference(q.cpu(), k.cpu(), v.cpu(), kv_lengths=kvl.cpu())) <= 2e-5
    assert rel_error(w.cpu(), _reference_weights(q.cpu(), k.cpu(), kv_lengths=kvl.cpu())) <= 2e-5
    # Dropout: the same seed gives the same mask on CPU and CUDA.
    torch.manual_seed(9)
    out_cuda, w_cuda = ops.cross_modal_attention(q, k, v, kv_lengths=kvl, dropout_p=0.25, need_weights=True)
    torch.manual_seed(9)
    out_cpu, w_cpu = ops.cross_modal_attention(q.cpu(), k.cpu(), v.cpu(), kv_lengths=kvl.cpu(), dropout_p=0.25,
                                               need_weights=True)
    assert torch.equal(w_cuda.cpu() > 0, w_cpu > 0)
    assert rel_error(out_cuda.cpu(), out_cpu) <= 2e-5
    g = torch.randn(out.shape, generator=gen).cuda()
    first = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=kvl), q, k, v, g)
    again = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=kvl), q, k, v, g)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="kv_lengths"):
        ops.cross_modal_attention(q, k, v, kv_lengths=torch.full((3,), 42, device="cuda"))
    lq, lk = torch.tensor([5, 0, 29]), torch.tensor([41, 7, 1])
    qp, kp, vp = _pack(q.cpu(), lq).cuda(), _pack(k.cpu(), lk).cuda(), _pack(v.cpu(), lk).cuda()
    got = ops.cross_modal_attention_varlen(qp, kp, vp, _cu(lq).cuda(), _cu(lk).cuda(), 29, 41, causal=True)
    want = ops.cross_modal_attention_varlen(qp.cpu(), kp.cpu(), vp.cpu(), _cu(lq), _cu(lk), 29, 41, causal=True)
    assert rel_error(got.cpu(), want) <= 2e-5


@requires_cuda
def test_cuda_opcheck_and_compile(gen):
    q, k, v = (t.cuda().requires_grad_() for t in _inputs(gen, 2, 3, 5, 7, 4, 4))
    torch.library.opcheck(torch.ops.affectkit.cross_modal_attention.default,
                          (q, k, v, torch.tensor([7, 2]).cuda(), None, None, None, 5, 7, None, True, 0.5, 0.0, None))
    step = _compiled_step("inductor")
    step(q, k, v, torch.tensor([7, 3]).cuda(), (torch.rand(2, 1, 5, 7, generator=gen) > 0.2).cuda()).backward()
    assert torch.isfinite(q.grad).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_additive_mask_grad_matches_cpu(dtype, gen):
    B, H, Lq, Lk, D = 3, 4, 37, 50, 32
    q, k, v = _inputs(gen, B, H, Lq, Lk, D, D)
    mask = _additive_mask(gen, (B, 1, Lq, Lk), torch.float32)
    g = torch.randn(B, H, Lq, D, generator=gen)
    kw = dict(kv_lengths=torch.tensor([50, 0, 20]), q_lengths=torch.tensor([37, 5, 30]), causal=True)
    want = _mask_grads(lambda a, b, c, m: reference(a, b, c, attn_mask=m, **kw), q.double(), k.double(), v.double(),
                       mask.double(), g.double())
    kw_cuda = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    got = _mask_grads(lambda a, b, c, m: ops.cross_modal_attention(a, b, c, attn_mask=m, **kw_cuda),
                      q.to(dtype).cuda(), k.to(dtype).cuda(), v.to(dtype).cuda(), mask.cuda(), g.to(dtype).cuda())
    assert got[4].shape == mask.shape and torch.isfinite(got[4]).all()
    assert rel_error(got[4].cpu(), want[4]) <= GRAD_TOL[dtype]


# The tensor-core forward (csrc/attention/cross_attention_tc.cu) takes fp16/bf16 with D and Dv
# up to 128 and no dropout: 16-byte row copies when D, Dv are multiples of 8 and rows aligned,
# 4-byte copies for even D (MulT's D = 6), 2-byte loads otherwise (odd D and Dv, odd strides);
# everything here either runs it at awkward sizes or checks the fallback. The backward
# recomputes probabilities from the forward's lse, so the gradients check the lse too.
TC_SHAPES = [  # B, H, Lq, Lk, D, Dv
    (2, 2, 1, 1, 16, 16),
    (3, 2, 17, 65, 64, 64),
    (2, 3, 33, 33, 64, 64),
    (2, 2, 64, 257, 128, 128),
    (2, 1, 65, 17, 32, 64),
    (1, 2, 200, 64, 16, 16),
    (2, 1, 257, 200, 128, 128),
    (2, 2, 33, 200, 40, 24),
    (1, 1, 257, 1, 64, 128),
    (2, 3, 33, 33, 6, 6),      # MulT's head dimension: element-wise staging
    (2, 2, 50, 130, 6, 6),
    (2, 2, 50, 500, 6, 6),     # MulT's 50 x 500: more key tiles than K/V stages (they wrap)
    (2, 1, 20, 900, 32, 16),
    (2, 1, 17, 70, 1, 1),
    (1, 2, 65, 129, 13, 7),    # odd D and Dv: element-wise out stores
    (2, 1, 20, 65, 100, 24),   # D past 64, not a multiple of 8
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", TC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_tensor_core_forward_matches_reference(dtype, shape, gen):
    B, H, Lq, Lk, D, Dv = shape
    q, k, v = (t.cuda() for t in _inputs(gen, *shape, dtype=dtype))
    kvl = torch.randint(0, Lk + 1, (B,), generator=gen)
    kvl[0] = 0 if B > 1 else kvl[0]  # a sequence with no key: zeros, lse = +inf
    ql = torch.randint(0, Lq + 1, (B,), generator=gen)
    kvl, ql = kvl.cuda(), ql.cuda()
    bool_mask = (torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3).cuda()
    bool_mask[0, 0, Lq // 2] = False  # a fully masked row
    key_mask = (torch.rand(Lk, generator=gen) > 0.2).cuda()  # broadcast over B, H, Lq
    add_mask = _additive_mask(gen, (1, H, 1, Lk), torch.float32).cuda()
    add_full = _additive_mask(gen, (B, H, Lq, Lk), torch.float32).cuda()
    for kw in (
        dict(),
        dict(kv_lengths=kvl),
        dict(kv_lengths=kvl, q_lengths=ql, causal=True),
        dict(causal=True, scale=0.7),
        dict(attn_mask=bool_mask, kv_lengths=kvl),
        dict(attn_mask=key_mask, causal=True),
        dict(attn_mask=add_mask, q_lengths=ql),
        dict(attn_mask=add_full, kv_lengths=kvl, causal=True, scale=0.3),
    ):
        _check_against_reference(gen, q, k, v, **kw)
    out = ops.cross_modal_attention(q, k, v, kv_lengths=kvl, q_lengths=ql)
    for b in range(B):  # rows past q_lengths and sequences with no key are exact zeros
        n = int(ql[b]) if int(kvl[b]) > 0 else 0
        assert (out[b, :, n:] == 0).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_core_forward_strides_and_fallbacks(dtype, gen):
    B, H, Lq, Lk, D = 2, 3, 70, 130, 64
    # (B, L, H, D) memory viewed as (B, H, L, D): arbitrary but 16-byte aligned row strides.
    q = torch.randn(B, Lq, H, D, generator=gen).to(dtype).cuda().transpose(1, 2)
    k = torch.randn(B, Lk, H, D, generator=gen).to(dtype).cuda().transpose(1, 2)
    v = torch.randn(B, Lk, H, 2 * D, generator=gen).to(dtype).cuda().transpose(1, 2)[..., D:]
    kvl = torch.tensor([Lk, 37]).cuda()
    _check_against_reference(gen, q, k, v, kv_lengths=kvl, causal=True)
    # Misaligned rows (odd row strides) take the element-wise staging.
    qo = torch.randn(B, H, Lq, D + 1, generator=gen).to(dtype).cuda()[..., 1:]
    _check_against_reference(gen, qo, k.contiguous(), v.contiguous(), kv_lengths=kvl)
    vo = torch.randn(B, H, Lk, 7, generator=gen).to(dtype).cuda()[..., 1:]  # Dv = 6, row stride 7
    _check_against_reference(gen, qo, k.contiguous(), vo, kv_lengths=kvl, causal=True)
    q5, k5, v5 = (t.cuda() for t in _inputs(gen, B, H, Lq, Lk, 20, 20, dtype=dtype))
    _check_against_reference(gen, q5, k5, v5, causal=True)
    # Dropout takes the generic kernel.
    torch.manual_seed(3)
    out = ops.cross_modal_attention(q, k, v, dropout_p=0.2)
    assert torch.isfinite(out).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_tensor_core_forward_varlen(dtype, causal, gen):
    H, D, Dv = 2, 32, 64
    lq = torch.tensor([1, 65, 0, 17, 130])
    lk = torch.tensor([4, 200, 5, 0, 64])
    Lq, Lk = 130, 200
    qp = torch.randn(int(lq.sum()), H, D, generator=gen, dtype=torch.float64).to(dtype)
    kp = torch.randn(int(lk.sum()), H, D, generator=gen, dtype=torch.float64).to(dtype)
    vp = torch.randn(int(lk.sum()), H, Dv, generator=gen, dtype=torch.float64).to(dtype)
    mask = (torch.rand(1, H, Lq, Lk, generator=gen) > 0.25)
    g = torch.randn(int(lq.sum()), H, Dv, generator=gen, dtype=torch.float64)

    def run(device, cast):
        ts = [t.to(device, cast).detach().requires_grad_() for t in (qp, kp, vp)]
        out = ops.cross_modal_attention_varlen(*ts, _cu(lq).to(device), _cu(lk).to(device), Lq, Lk,
                                               attn_mask=mask.to(device), causal=causal)
        out.backward(g.to(device, cast))
        return [out.detach().cpu()] + [t.grad.cpu() for t in ts]

    got = run("cuda", dtype)
    want = run("cpu", torch.float64)
    assert got[0].dtype == dtype and torch.isfinite(got[0]).all()
    assert rel_error(got[0], want[0]) <= TOL[dtype]
    for name, a, b in zip(("q", "k", "v"), got[1:], want[1:]):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, b) <= GRAD_TOL[dtype], name


# The tensor-core backward (csrc/attention/cross_attention_tc_backward.cu) takes the same
# problems as the tensor-core forward (the same row copies, chosen over q, k, v, out and
# grad_out): key tiles of
# 64, query tiles of 64 (32 at D = Dv = 128), so these sizes cover partial, single and multiple
# tiles on both axes, empty key sets, causal offsets of both signs and the dS (mask) output.
TC_BWD_SHAPES = [  # B, H, Lq, Lk, D, Dv
    (2, 2, 1, 17, 16, 16),
    (3, 2, 33, 33, 64, 64),
    (2, 2, 65, 200, 128, 128),
    (2, 1, 200, 65, 32, 64),
    (2, 2, 17, 1, 64, 64),
    (1, 2, 200, 200, 16, 16),
    (2, 1, 33, 65, 64, 32),
    (2, 3, 33, 33, 6, 6),     # MulT's head dimension: element-wise staging
    (2, 2, 17, 70, 13, 7),    # odd D and Dv: 2-byte gradient stores
    (2, 1, 65, 20, 1, 1),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_core_backward_matches_reference(dtype, gen):
    for shape in TC_BWD_SHAPES:
        B, H, Lq, Lk, D, Dv = shape
        q, k, v = (t.cuda() for t in _inputs(gen, *shape, dtype=dtype))
        kvl = torch.randint(0, Lk + 1, (B,), generator=gen)
        kvl[0] = 0  # a sequence with no key: zero gradients, never NaN
        ql = torch.randint(0, Lq + 1, (B,), generator=gen)
        kvl, ql = kvl.cuda(), ql.cuda()
        bool_mask = (torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3).cuda()
        bool_mask[-1, 0, Lq // 2] = False  # a fully masked row
        for kw in (
            dict(),
            dict(kv_lengths=kvl, q_lengths=ql),
            dict(kv_lengths=kvl, q_lengths=ql, causal=True),
            dict(causal=True, scale=0.7),
            dict(attn_mask=bool_mask, kv_lengths=kvl),
        ):
            _check_against_reference(gen, q, k, v, **kw)
        # Exact zeros past the lengths (the kernels write every row of the gradients).
        g = torch.randn(B, H, Lq, Dv, generator=gen).to(dtype).cuda()
        _, gq, gk, gv = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, kv_lengths=kvl, q_lengths=ql),
                               q, k, v, g)
        for b in range(B):
            nq = int(ql[b]) if int(kvl[b]) > 0 else 0
            assert (gq[b, :, nq:] == 0).all() and (gk[b, :, int(kvl[b]):] == 0).all()
            assert (gv[b, :, int(kvl[b]):] == 0).all()
            if nq == 0:
                assert (gk[b] == 0).all() and (gv[b] == 0).all()
        # An additive float mask that requires grad (dS output), strided and broadcast over Lq.
        for mshape in ((B, H, Lq, Lk), (1, H, 1, Lk)):
            mask = _additive_mask(gen, mshape, torch.float32).cuda()
            kw = dict(kv_lengths=kvl, q_lengths=ql, causal=True)
            want = _mask_grads(lambda a, b, c, m: reference(a, b, c, attn_mask=m, **kw), q.double(), k.double(),
                               v.double(), mask.double(), g.double())
            got = _mask_grads(lambda a, b, c, m: ops.cross_modal_attention(a, b, c, attn_mask=m, **kw), q, k, v,
                              mask, g)
            assert got[4].shape == mask.shape
            for name, a, b in zip(("q", "k", "v", "mask"), got[1:], want[1:]):
                assert torch.isfinite(a).all(), (shape, name)
                assert rel_error(a, b) <= GRAD_TOL[dtype], (shape, name)
        # Determinism: the same inputs give bit-identical gradients.
        kw = dict(attn_mask=bool_mask, kv_lengths=kvl, causal=True)
        first = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g)
        again = _grads(lambda a, b, c: ops.cross_modal_attention(a, b, c, **kw), q, k, v, g)
        for a, b in zip(first, again):
            assert torch.equal(a, b)

    # Packed (varlen) layout, causal, with empty sequences on either side.
    H, D = 2, 64
    lq = torch.tensor([1, 65, 0, 17, 200, 33])
    lk = torch.tensor([17, 200, 5, 0, 65, 33])
    Lq, Lk = 200, 200
    qp = torch.randn(int(lq.sum()), H, D, generator=gen, dtype=torch.float64)
    kp = torch.randn(int(lk.sum()), H, D, generator=gen, dtype=torch.float64)
    vp = torch.randn(int(lk.sum()), H, D, generator=gen, dtype=torch.float64)
    g = torch.randn(int(lq.sum()), H, D, generator=gen, dtype=torch.float64)
    for causal in (False, True):
        grads = []
        for device, cast in (("cuda", dtype), ("cpu", torch.float64)):
            ts = [t.to(device, cast).detach().requires_grad_() for t in (qp, kp, vp)]
            out = ops.cross_modal_attention_varlen(*ts, _cu(lq).to(device), _cu(lk).to(device), Lq, Lk,
                                                   causal=causal)
            out.backward(g.to(device, cast))
            grads.append([t.grad.cpu() for t in ts])
        for name, a, b in zip(("q", "k", "v"), *grads):
            assert torch.isfinite(a).all(), name
            assert rel_error(a, b) <= GRAD_TOL[dtype], (causal, name)


# ------------------------------------------------------------- CUDA value checks (one read back)


def test_index_value_checks_report_the_first_bad_tensor():
    # The helper the CUDA path uses (the CPU core checks values itself); plain torch, so it runs
    # on CPU tensors here.
    from affectkit.ops.attention import _check_index_values as check

    ok_lengths = [("q_lengths", torch.tensor([4, 0]), 4), ("kv_lengths", torch.tensor([5, 1]), 5)]
    check(ok_lengths, [("cu_seqlens_q", None, 0, 0)])
    check([], [("cu_seqlens_q", torch.tensor([0, 2, 5]), 5, 3), ("cu_seqlens_k", torch.tensor([0]), 0, 0)])
    with pytest.raises(ValueError, match=r"kv_lengths: expected values in \[0, 5\], got 6"):
        check([ok_lengths[0], ("kv_lengths", torch.tensor([6, 1]), 5)], [])
    with pytest.raises(ValueError, match=r"q_lengths: expected values in \[0, 4\], got -1"):
        check([("q_lengths", torch.tensor([-1, 9]), 4), ("kv_lengths", torch.tensor([9]), 5)], [])
    for cu, total, max_len in (([1, 2, 5], 5, 3), ([0, 2, 4], 5, 3), ([0, 3, 2, 5], 5, 3), ([0, 4, 5], 5, 3)):
        with pytest.raises(ValueError, match=rf"cu_seqlens_k: expected offsets from 0 to {total}, non-decreasing, "
                                             rf"each sequence at most {max_len} rows, got \[{', '.join(map(str, cu))}\]"):
            check([], [("cu_seqlens_q", torch.tensor([0, 1]), 1, 1), ("cu_seqlens_k", torch.tensor(cu), total, max_len)])


@requires_cuda
def test_cuda_lengths_are_checked_with_one_synchronisation(gen):
    q, k, v = (t.cuda() for t in _inputs(gen, 3, 2, 9, 11, 8, 8))
    kvl, ql = torch.tensor([11, 3, 0]).cuda(), torch.tensor([9, 9, 2]).cuda()
    for need_weights in (False, True):  # the weights reuse the forward's check
        syncs = cuda_synchronisations(lambda: ops.cross_modal_attention(q, k, v, kv_lengths=kvl, q_lengths=ql,
                                                                        need_weights=need_weights))
        assert len(syncs) == 1, syncs
    with pytest.raises(ValueError, match=r"q_lengths: expected values in \[0, 9\], got 10"):
        ops.cross_modal_attention(q, k, v, kv_lengths=kvl, q_lengths=torch.tensor([10, 0, 1]).cuda())
