"""DGCNN: shapes on SEED/DEAP/DREAMER channel sets, a learned symmetric graph, learning a planted signal."""

import pytest
import torch

from affectkit.eeg import DEAP_CHANNELS, DREAMER_CHANNELS, SEED_CHANNELS
from affectkit.models import DGCNN


@pytest.mark.parametrize("channels,classes", [(SEED_CHANNELS, 3), (DEAP_CHANNELS, 2), (DREAMER_CHANNELS, 5), (7, 4)])
def test_shapes(channels, classes):
    m = DGCNN(channels, num_classes=classes).eval()
    n = channels if isinstance(channels, int) else len(channels)
    assert m(torch.randn(3, n, 5)).shape == (3, classes)


def test_learned_graph_is_symmetric_and_trained():
    torch.manual_seed(0)
    m = DGCNN(SEED_CHANNELS, num_classes=3)
    L = m.laplacian()
    torch.testing.assert_close(L, L.T)
    assert torch.linalg.eigvalsh(L.double()).abs().max() <= 1.0 + 1e-6  # spectrum in [-1, 1]
    loss = m(torch.randn(8, 62, 5)).logsumexp(1).mean()
    loss.backward()
    assert m.adjacency.weight.grad is not None and m.adjacency.weight.grad.abs().sum() > 0


def test_bad_input():
    m = DGCNN(DEAP_CHANNELS, num_classes=2)
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.randn(2, 31, 5))
    with pytest.raises(ValueError, match="channels"):
        DGCNN(0)


def test_learns_band_power():
    """Class = which band carries extra power on a few electrodes."""
    g = torch.Generator().manual_seed(0)
    n = 240
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 32, 5, generator=g)
    x[torch.arange(n), :8, y + 1] += 1.5
    torch.manual_seed(0)
    m = DGCNN(DEAP_CHANNELS, num_classes=3)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    assert (m(x).argmax(1) == y).float().mean() > 0.8
