"""affectkit.nn.CrossModalAttention against torch.nn.MultiheadAttention, and MultimodalFusion."""

import pytest
import torch
from torch import nn

from affectkit.nn import CrossModalAttention, MultimodalFusion
from affectkit.selfcheck import rel_error

from _support import requires_cuda


def _pair(gen, E, H, kdim=None, vdim=None, bias=True, dtype=torch.float64):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    mha = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=dtype)
    with torch.no_grad():  # non-zero biases so the test covers them
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_(generator=gen)
    ours = CrossModalAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, dtype=dtype)
    ours.load_state_dict(mha.state_dict())
    assert set(ours.state_dict()) == set(mha.state_dict())
    return mha, ours


def _compare(mha, ours, args, kwargs, tol, gen):
    args_a = [a.detach().clone().requires_grad_() for a in args]
    args_b = [a.detach().clone().requires_grad_() for a in args]
    if args[0] is args[1]:  # keep self-attention identity (it takes the fused projection path)
        args_a = [args_a[0]] * 3 if args[1] is args[2] else [args_a[0], args_a[0], args_a[2]]
        args_b = [args_b[0]] * 3 if args[1] is args[2] else [args_b[0], args_b[0], args_b[2]]
    want, want_w = mha(*args_a, **kwargs)
    got, got_w = ours(*args_b, **kwargs)
    assert rel_error(got, want) <= tol
    if want_w is None:
        assert got_w is None
    else:
        assert got_w.shape == want_w.shape and rel_error(got_w, want_w) <= tol
    g = torch.randn(want.shape, generator=gen, dtype=want.dtype).to(want.device)
    want.backward(g)
    got.backward(g)
    for a, b in zip(args_a, args_b):
        if a.grad is not None:
            assert rel_error(b.grad, a.grad) <= 10 * tol
    for (name, pa), (_, pb) in zip(mha.named_parameters(), ours.named_parameters()):
        assert rel_error(pb.grad, pa.grad) <= 10 * tol, name


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_multihead_attention_cross_modal(dtype, tol, gen):
    B, Lq, Lk, E, H = 4, 13, 29, 48, 6
    mha, ours = _pair(gen, E, H, kdim=20, vdim=36, dtype=dtype)
    q = torch.randn(B, Lq, E, generator=gen, dtype=dtype)
    k = torch.randn(B, Lk, 20, generator=gen, dtype=dtype)
    v = torch.randn(B, Lk, 36, generator=gen, dtype=dtype)
    kpm = torch.arange(Lk)[None, :] >= torch.tensor([29, 1, 10, 20])[:, None]
    _compare(mha, ours, (q, k, v), dict(key_padding_mask=kpm), tol, gen)
    _compare(mha, ours, (q, k, v), dict(key_padding_mask=kpm, average_attn_weights=False), tol, gen)
    _compare(mha, ours, (q, k, v), dict(need_weights=False), tol, gen)


def test_matches_multihead_attention_self_attention_every_mask(gen):
    B, L, E, H = 3, 17, 32, 4
    mha, ours = _pair(gen, E, H)
    x = torch.randn(B, L, E, generator=gen, dtype=torch.float64)
    kpm = torch.arange(L)[None, :] >= torch.tensor([17, 5, 9])[:, None]
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    add = torch.randn(B * H, L, L, generator=gen, dtype=torch.float64)
    float_kpm = torch.zeros(B, L, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    for kwargs in (dict(), dict(attn_mask=causal, key_padding_mask=kpm), dict(attn_mask=causal, is_causal=True),
                   dict(attn_mask=add, key_padding_mask=kpm), dict(attn_mask=add, key_padding_mask=float_kpm)):
        _compare(mha, ours, (x, x, x), kwargs, 1e-12, gen)
    # key is value but not query, and no bias
    mha, ours = _pair(gen, E, H, bias=False)
    y = torch.randn(B, L + 3, E, generator=gen, dtype=torch.float64)
    _compare(mha, ours, (x, y, y), dict(key_padding_mask=torch.zeros(B, L + 3, dtype=torch.bool)), 1e-12, gen)


def test_unbatched_input_and_lengths_extension(gen):
    mha, ours = _pair(gen, 16, 2)
    x = torch.randn(7, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 16, generator=gen, dtype=torch.float64)
    _compare(mha, ours, (x, y, y), {}, 1e-12, gen)
    # kv_lengths says what a prefix key_padding_mask says
    B, Lk = 3, 9
    xb = torch.randn(B, 7, 16, generator=gen, dtype=torch.float64)
    yb = torch.randn(B, Lk, 16, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4])
    a, wa = ours(xb, yb, yb, kv_lengths=lengths)
    b, wb = ours(xb, yb, yb, key_padding_mask=torch.arange(Lk)[None] >= lengths[:, None])
    assert rel_error(a, b) <= 1e-12 and rel_error(wa, wb) <= 1e-12


def test_dropout_only_in_training(gen):
    ours = CrossModalAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 5, 16, generator=gen)
    ours.eval()
    a, _ = ours(x, x, x)
    b, _ = ours(x, x, x)
    assert torch.equal(a, b)
    ours.train()
    torch.manual_seed(0)
    c, wc = ours(x, x, x)
    torch.manual_seed(0)
    d, wd = ours(x, x, x)
    assert torch.equal(c, d) and torch.equal(wc, wd)
    assert not torch.allclose(c, a)


def test_bad_module_inputs():
    with pytest.raises(ValueError, match="embed_dim: expected a positive multiple of num_heads = 3, got 16"):
        CrossModalAttention(16, 3)
    with pytest.raises(ValueError, match="batch_first: expected True"):
        CrossModalAttention(16, 2, batch_first=False)
    m = CrossModalAttention(16, 2)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"key: expected shape \(B, L, 16\), got \(2, 5, 8\)"):
        m(x, torch.randn(2, 5, 8), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 5\)"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask: expected shape \(4, 5, 5\)"):
        m(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))


def _fusion_reference(fusion, text, others, lengths):
    """The same fusion built from torch.nn.MultiheadAttention blocks and plain LayerNorm."""
    B, L, E = text.shape
    kpm = None if lengths is None else torch.arange(L)[None, :] >= lengths[:, None]
    x = text
    for i, layer in enumerate(fusion.layers):
        acc = x
        for m, y in enumerate(others):
            block = fusion.attention_block(i, m)
            d = fusion.modality_dims[m]
            mha = nn.MultiheadAttention(E, fusion.num_heads, kdim=d, vdim=d, batch_first=True, dtype=x.dtype)
            mha.load_state_dict(block.state_dict())
            out, _ = mha(x, y, y, key_padding_mask=kpm, need_weights=False)
            acc = acc + torch.nan_to_num(out)  # a dialogue of length 0 gives NaN rows in MHA
        x = layer.norm(acc)
    if lengths is not None:
        x = x * (torch.arange(L)[None, :, None] < lengths[:, None, None])
    return x


@pytest.mark.parametrize("dims", [(), (24, 40, 8)])
def test_multimodal_fusion_matches_multihead_attention_stack(dims, gen):
    B, L, E, H = 5, 11, 32, 4
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fusion = MultimodalFusion(E, H, modality_dims=dims, num_layers=2, dtype=torch.float64)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 0.2, generator=gen)
    text = torch.randn(B, L, E, generator=gen, dtype=torch.float64)
    others = [torch.randn(B, L, d, generator=gen, dtype=torch.float64) for d in fusion.modality_dims]
    lengths = torch.tensor([11, 1, 6, 0, 9])
    got = fusion(text, others, lengths)
    want = _fusion_reference(fusion, text, others, lengths)
    assert rel_error(got, want) <= 1e-12
    got_full = fusion(text, others)
    assert rel_error(got_full, _fusion_reference(fusion, text, others, None)) <= 1e-12
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_multimodal_fusion_compiles_without_graph_break(gen):
    torch._dynamo.reset()
    fusion = MultimodalFusion(16, 2, num_layers=2)
    text = torch.randn(3, 7, 16, generator=gen)
    others = [torch.randn(3, 7, 16, generator=gen) for _ in range(2)]
    lengths = torch.tensor([7, 2, 5])
    compiled = torch.compile(fusion, backend="aot_eager", fullgraph=True, dynamic=True)
    got = compiled(text, others, lengths)
    assert rel_error(got, fusion(text, others, lengths)) <= 1e-6
    got.sum().backward()


def test_multimodal_fusion_bad_inputs():
    fusion = MultimodalFusion(16, 2)
    with pytest.raises(ValueError, match="others: expected 2 modality tensors, got 1"):
        fusion(torch.randn(2, 3, 16), [torch.randn(2, 3, 16)])
    with pytest.raises(ValueError, match=r"others\[1\]: expected shape \(2, 3, 16\)"):
        fusion(torch.randn(2, 3, 16), [torch.randn(2, 3, 16), torch.randn(2, 4, 16)])


@requires_cuda
def test_cuda_module_matches_multihead_attention(gen):
    mha, ours = _pair(gen, 64, 8, dtype=torch.float32)
    mha, ours = mha.cuda(), ours.cuda()
    x = torch.randn(8, 33, 64, generator=gen).cuda()
    kpm = (torch.arange(33)[None, :] >= torch.randint(1, 34, (8,), generator=gen)[:, None]).cuda()
    _compare(mha, ours, (x, x, x), dict(key_padding_mask=kpm), 2e-5, gen)
