"""MulT (affectkit.models.MulT) with its attention on the fused op ("affectkit": attention="fused")
against the same model and weights on torch.nn.MultiheadAttention ("torch": attention="torch").

Shape: CMU-MOSI's unaligned word-level sequences as MulT published them (text 50 x 300, audio
375 x 74, vision 500 x 35; model width 30, 5 heads of dimension 6, 5 cross-modal layers, 5
self-attention layers of width 60, the bottom-right causal mask), float32, batch 8 (MulT
trained with 24; 8 keeps a CPU run to minutes). "full": every step valid, as MulT ran
(padding treated as data); "ragged": lengths uniform in [L/2, L] per modality (key padding).

Floor, forward, full lengths: attention 4*B*Lq*Lk*width flops summed over the six
cross-modal pairs (462,500 Lq*Lk, width 30) and three self-attentions (393,125 L^2, width 60)
times 5 layers: 2.2 + 3.8 GFLOP; the linear layers about 4.8 GFLOP; some 11 GFLOP in all, so
about 60 ms at the ~180 GFLOP/s of a large float32 GEMM on 2 cores. Forward + backward is
about three times that. Head dimension 6 keeps the attention far from GEMM speed in both
implementations (one exp per score and per-row softmax bookkeeping dominate).
"""

import pytest
import torch

from affectkit.models import MulT

SHAPES = {"full": False, "ragged": True}
B, LENGTHS, DIMS = 8, (50, 375, 500), (300, 74, 35)


def _setup(impl, ragged, train):
    torch.manual_seed(0)
    fused = MulT(*DIMS)
    model = fused if impl == "affectkit" else MulT(*DIMS, attention="torch")
    model.load_state_dict(fused.state_dict())
    model.train(train)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(B, L, d, generator=g) for L, d in zip(LENGTHS, DIMS)]
    lengths = {}
    if ragged:
        names = ("text_lengths", "audio_lengths", "vision_lengths")
        lengths = {n: torch.randint(L // 2, L + 1, (B,), generator=g) for n, L in zip(names, LENGTHS)}
    target = torch.randn(B, 1, generator=g)
    return model, inputs, lengths, target


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_mult_forward(bench, impl, shape):
    model, inputs, lengths, _ = _setup(impl, SHAPES[shape], train=False)

    def forward(*x):
        with torch.no_grad():
            return model(*x, **lengths)

    bench(f"MulT fwd B={B} 50/375/500 {shape}", impl, forward, *inputs)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_mult_training_step(bench, impl, shape):
    model, inputs, lengths, target = _setup(impl, SHAPES[shape], train=True)

    def step(*x):
        model.zero_grad(set_to_none=True)
        model.loss(model(*x, **lengths), target).backward()

    bench(f"MulT fwd+bwd B={B} 50/375/500 {shape}", impl, step, *inputs)
