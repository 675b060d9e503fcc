"""cross_modal_attention against torch's scaled_dot_product_attention with key padding.

Shapes: M2FNet-like dialogues (B=64, H=8, 33 x 33, D=64), MulT's cross-modal transformer
(B=32, H=8, 50 x 375, D=32) and MulT's head dimension 6 (where SDPA takes its math path).
affectkit receives the key padding as kv_lengths; SDPA receives the equivalent boolean
attn_mask (B, 1, 1, Lk); the "bool mask" groups give affectkit the same boolean mask.

Floor, per call: forward 4*B*H*Lq*Lk*D flops (QK^T and PV, 2 each) over full lengths, and
backward about 10*B*H*Lq*Lk*D (recomputed QK^T, dO V^T, dV, dK, dQ); bytes: q, k, v read and
out written once, 4*B*H*(2*Lq*D + 2*Lk*D) in float32 (backward about twice that).
- B=64 H=8 33x33 D=64: 143 MFLOP and 17.3 MB forward, 8 flop/byte: on 2 cores (~180 GFLOP/s
  GEMM, some 20 GB/s of DRAM bandwidth unloaded) the bytes set the floor, ~0.9 ms, and the
  flops ~0.8 ms. Padded keys (about half here) are skipped, which SDPA cannot do.
- MulT B=32 H=8 50x375 D=32: 614 MFLOP, 28 MB: compute bound, ~3.4 ms at GEMM speed.
- D=6: 13 MFLOP (33x33) with 1.6 MB: neither; one exp per score and per-row bookkeeping set
  the time.
bfloat16 on the CPU (the "bfloat16" groups): half the bytes read; affectkit widens q, k, v
to float32 once and runs its float32 kernels (float32 accumulation), SDPA runs its bfloat16
CPU path; the flops are the same as above.
On the shared development machine (load average 6-10 on 2 cores during measurement) the
single-thread kernel reaches ~50-80 GFLOP/s nominal at 33x33 D=64 and ~95 at MulT; see
benchmarks/RESULTS.md and benchmarks/attention_cpu_time.py for steadier CPU-time ratios.
"""

import pytest
import torch
import torch.nn.functional as F

import affectkit.ops as ops
from affectkit.nn import MultimodalFusion

SHAPES = {  # B, H, Lq, Lk, D
    "m2fnet_64x8x33x33_d64": (64, 8, 33, 33, 64),
    "mult_32x8x50x375_d32": (32, 8, 50, 375, 32),
    "mult_d6_64x8x33x33": (64, 8, 33, 33, 6),
    "mult_d6_32x8x50x375": (32, 8, 50, 375, 6),
    # One query against a long memory (streaming decoding): bound by reading K and V once,
    # 2 * 2 * 4 * 8,192 * 64 * 4 B = 33.6 MB, ~0.85 ms at the two cores' ~40 GB/s.
    "decode_2x4x1x8192_d64": (2, 4, 1, 8192, 64),
}


def _inputs(B, H, Lq, Lk, D, requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_(requires_grad) for L in (Lq, Lk, Lk))
    lengths = torch.randint(1, Lk + 1, (B,), generator=g)
    mask = (torch.arange(Lk)[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, lengths, mask


def ours_lengths(q, k, v, lengths, mask):
    return ops.cross_modal_attention(q, k, v, kv_lengths=lengths)


def ours_mask(q, k, v, lengths, mask):
    return ops.cross_modal_attention(q, k, v, attn_mask=mask)


def torch_sdpa(q, k, v, lengths, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _fwd_bwd(fn):
    def step(q, k, v, lengths, mask):
        fn(q, k, v, lengths, mask).sum().backward()
        q.grad = k.grad = v.grad = None

    return step


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("name", list(SHAPES))
def bench_cross_modal_attention_forward(bench, impl, name):
    args = _inputs(*SHAPES[name])
    with torch.no_grad():
        bench(f"attention fwd {name}", impl, ours_lengths if impl == "affectkit" else torch_sdpa, *args)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("name", list(SHAPES))
def bench_cross_modal_attention_forward_backward(bench, impl, name):
    args = _inputs(*SHAPES[name], requires_grad=True)
    bench(f"attention fwd+bwd {name}", impl, _fwd_bwd(ours_lengths if impl == "affectkit" else torch_sdpa), *args)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("name", ["m2fnet_64x8x33x33_d64", "mult_32x8x50x375_d32"])
def bench_cross_modal_attention_bool_mask(bench, impl, name):
    args = _inputs(*SHAPES[name])
    with torch.no_grad():
        bench(f"attention fwd (bool mask) {name}", impl, ours_mask if impl == "affectkit" else torch_sdpa, *args)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("name", ["m2fnet_64x8x33x33_d64", "mult_32x8x50x375_d32", "mult_d6_64x8x33x33"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def bench_cross_modal_attention_bfloat16(bench, impl, name, mode):
    args = _inputs(*SHAPES[name], requires_grad=mode == "fwd+bwd", dtype=torch.bfloat16)
    fn = ours_lengths if impl == "affectkit" else torch_sdpa
    if mode == "fwd":
        with torch.no_grad():
            bench(f"attention bfloat16 fwd {name}", impl, fn, *args)
    else:
        bench(f"attention bfloat16 fwd+bwd {name}", impl, _fwd_bwd(fn), *args)


class _MHAFusion(torch.nn.Module):
    """The stock-PyTorch fusion layer: two nn.MultiheadAttention (text queries audio, visual)
    added to the text stream, then LayerNorm."""

    def __init__(self, E, H):
        super().__init__()
        self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(E, H, batch_first=True) for _ in range(2))
        self.norm = torch.nn.LayerNorm(E)

    def forward(self, text, others, lengths):
        kpm = torch.arange(text.shape[1])[None, :] >= lengths[:, None]
        out = text
        for attn, y in zip(self.attn, others):
            out = out + attn(text, y, y, key_padding_mask=kpm, need_weights=False)[0]
        return self.norm(out)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def bench_m2fnet_fusion_layer(bench, impl):
    B, L, E, H = 64, 33, 768, 8
    g = torch.Generator().manual_seed(0)
    text = torch.randn(B, L, E, generator=g)
    others = [torch.randn(B, L, E, generator=g) for _ in range(2)]
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    layer = MultimodalFusion(E, H, num_layers=1) if impl == "affectkit" else _MHAFusion(E, H)
    layer.eval()
    with torch.no_grad():
        bench("m2fnet fusion layer fwd (64x33, 768, 8 heads)", impl, layer, text, others, lengths)
