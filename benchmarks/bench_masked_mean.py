"""masked_mean (utterance pooling) against the stock PyTorch composite.

Floor: the op reads B*L*F elements once and writes B*F, so it is memory bound.
"""

import pytest
import torch

import affectkit.ops as ops

SHAPES = [(64, 33, 768), (256, 50, 300), (8, 2048, 64)]


from _devices import DEVICES


def torch_masked_mean(x, lengths):
    mask = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths[:, None, None]
    return (x * mask).sum(1) / lengths.clamp(min=1)[:, None]


def _inputs(B, L, F, device, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, F, generator=g).to(device).requires_grad_(requires_grad)
    lengths = torch.randint(1, L + 1, (B,), generator=g).to(device)
    return x, lengths


def _fwd_bwd(fn):
    def step(x, lengths):
        fn(x, lengths).sum().backward()
        x.grad = None

    return step


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def bench_masked_mean_forward(bench, device, impl, shape):
    x, lengths = _inputs(*shape, device)
    fn = ops.masked_mean if impl == "affectkit" else torch_masked_mean
    with torch.no_grad():
        bench(f"masked_mean fwd {device} {shape}", impl, fn, x, lengths)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def bench_masked_mean_forward_backward(bench, device, impl, shape):
    x, lengths = _inputs(*shape, device, requires_grad=True)
    fn = ops.masked_mean if impl == "affectkit" else torch_masked_mean
    bench(f"masked_mean fwd+bwd {device} {shape}", impl, _fwd_bwd(fn), x, lengths)
