"""HiSTN on the affectkit graph ops against the same model on stock PyTorch ops.

Setting of the issue: all DREAMER-sized windows, 23 subjects x 18 clips x 60 s = 24,840
windows of (14, 128) float32; one training epoch (batches of 256, Adam, as the official
script) and inference over all windows (batches of 2,048). Both implementations share the
state dict and the stock-PyTorch front end (temporal convolutions, batch norms: most of the
arithmetic); they differ in the graph steps: four per-region Chebyshev filters, the ring
filter and four attention poolings.

Floor (forward, per window): the fused 64-tap temporal kernel 2*14*128*64 = 229 kFLOP, the
depthwise 5-tap and BN/ELU ~30 kFLOP, the graph steps ~2*(4*4^2+2*3^2+4^2)*62*3 ~ 40 kFLOP:
~0.3 MFLOP and 7 kB of input per window, so 24,840 windows are ~7.5 GFLOP and 178 MB: well
under a second of arithmetic on two cores. Both paths are dominated by per-op overheads on
small tensors (dozens of ops on (B, <=14, 62) tensors), not by the floor; the graph ops are a
small share of the time, so ratios near 1 are what to expect here.

Set AFFECTKIT_HISTN_WINDOWS to change the size; with --benchmark-disable (the test suite) a
small size (512) runs once as a smoke test.
"""

import os

import pytest
import torch

from affectkit.models import HiSTN, gaussian_ordinal_loss

from _devices import DEVICES

FULL = 23 * 18 * 60


@pytest.fixture
def windows(request):
    if request.config.getoption("benchmark_disable", False):
        return 512
    return int(os.environ.get("AFFECTKIT_HISTN_WINDOWS", FULL))


def _setup(n, device, backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 14, 128, generator=g).to(device)
    y = torch.randint(0, 5, (n,), generator=g).to(device)
    torch.manual_seed(0)
    ref = HiSTN(backend="affectkit")
    model = HiSTN(backend=backend)
    model.load_state_dict(ref.state_dict())
    return model.to(device), x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_histn_train_epoch(bench, windows, device, impl):
    model, x, y = _setup(windows, device, impl)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch():
        model.train()
        for idx in torch.arange(len(x), device=x.device).split(256):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            gaussian_ordinal_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            model.constrain_()
        return model.classifier.weight

    out = bench(f"histn train epoch {windows} windows {device}", impl, epoch)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_histn_inference(bench, windows, device, impl):
    model, x, _ = _setup(windows, device, impl)
    model.eval()

    @torch.no_grad()
    def infer():
        return torch.cat([model(b) for b in x.split(2048)])

    out = bench(f"histn inference {windows} windows {device}", impl, infer)
    assert out.shape == (windows, 5) and torch.isfinite(out).all()
