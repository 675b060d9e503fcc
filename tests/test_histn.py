"""HiSTN: parameter count, shapes, affectkit-ops backend == stock-PyTorch backend, ordinal loss."""

import pytest
import torch

from affectkit.models import HiSTN, gaussian_ordinal_loss, gaussian_ordinal_targets
from affectkit.models.histn import count_parameters


def _pair(dtype, seed):
    torch.manual_seed(seed)
    a = HiSTN(backend="affectkit").to(dtype)
    b = HiSTN(backend="torch").to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def test_parameter_count_matches_official():
    n = count_parameters(HiSTN())
    assert abs(n - 1181) <= 0.1 * 1181, n
    assert n == 1181  # the exact count of the official HST_model (dense merge, F1 = 8, ksize = 64)


def test_shapes_and_bad_input():
    m = HiSTN().eval()
    assert m(torch.randn(3, 14, 128)).shape == (3, 5)
    assert m(torch.randn(1, 14, 128)).shape == (1, 5)
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.randn(3, 13, 128))
    with pytest.raises(ValueError, match="backend"):
        HiSTN(backend="tf")
    with pytest.raises(ValueError, match="regions"):
        HiSTN(regions={"a": ["AF3"]})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("train", [False, True])
def test_backends_agree(dtype, tol, train):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    a, b = _pair(dtype, seed)
    a.train(train)
    b.train(train)
    x = torch.randn(6, 14, 128, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)  # same dropout masks
    ya = a(xa)
    torch.manual_seed(seed)
    yb = b(xb)
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    target = torch.randint(0, 5, (6,))
    gaussian_ordinal_loss(ya, target).backward()
    gaussian_ordinal_loss(yb, target).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=tol, atol=tol, msg=name)


def test_gradcheck_affectkit_backend():
    torch.manual_seed(0)
    m = HiSTN(dropout=0.0, samples=24, kernel_size=8).double().eval()  # small: gradcheck is O(inputs)
    x = torch.randn(2, 14, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_gaussian_ordinal_targets():
    soft = gaussian_ordinal_targets(torch.tensor([0, 2, 4]))
    assert torch.allclose(soft.sum(1), torch.ones(3, dtype=soft.dtype))
    assert soft.argmax(1).tolist() == [0, 2, 4]
    # symmetric around the middle class, neighbours weighted exp(-2) relative to the peak
    assert torch.isclose(soft[1, 1], soft[1, 3]) and torch.isclose(soft[1, 1] / soft[1, 2],
                                                                    torch.exp(torch.tensor(-2.0, dtype=soft.dtype)))
    logits = torch.randn(4, 5, requires_grad=True)
    loss = gaussian_ordinal_loss(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss.item() > 0 and logits.grad is not None
    with pytest.raises(ValueError, match="sigma"):
        gaussian_ordinal_targets(torch.tensor([1]), sigma=0)


def test_constraints_apply():
    m = HiSTN()
    with torch.no_grad():
        m.mix.fill_(3.0)
        m.depthwise.weight.fill_(2.0)
    m.constrain_()
    assert m.mix.abs().max() <= 1.0
    assert m.depthwise.weight.norm(dim=2).max() <= 1.0 + 1e-6


def test_learns_a_planted_rhythm():
    """A few steps on windows whose class sets a rhythm's frequency beat chance clearly."""
    g = torch.Generator().manual_seed(0)
    n = 160
    y = torch.randint(0, 5, (n,), generator=g)
    t = torch.arange(128) / 128.0
    phase = torch.rand(n, 14, 1, generator=g) * 6.283
    x = torch.sin(2 * torch.pi * (6 + 5 * y)[:, None, None] * t + phase) + 0.5 * torch.randn(n, 14, 128, generator=g)
    torch.manual_seed(0)
    m = HiSTN(dropout=0.1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        gaussian_ordinal_loss(m(x), y).backward()
        opt.step()
        m.constrain_()
    m.eval()
    acc = (m(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_front_end_is_the_two_step_keras_stack():
    """The fused per-electrode kernel equals F1 'same' convolutions followed by the depthwise mix."""
    torch.manual_seed(1)
    m = HiSTN().double().eval()
    x = torch.randn(3, 14, 128, dtype=torch.float64)
    maps = torch.nn.functional.conv1d(x.reshape(42, 1, 128), m.temporal.unsqueeze(1), padding="same")  # (42, F1, T)
    mixed = torch.einsum("bcft,cf->bct", maps.reshape(3, 14, 8, 128), m.mix)
    k = m.temporal.shape[1]
    fused = torch.nn.functional.conv1d(torch.nn.functional.pad(x, ((k - 1) // 2, k // 2)),
                                       (m.mix @ m.temporal).unsqueeze(1), groups=14)
    torch.testing.assert_close(fused, mixed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["deap", "seed"])
def test_other_montages_backends_agree(name):
    from affectkit.eeg import DEAP_CHANNELS, SEED_CHANNELS, lobe_hemisphere_groups

    channels = {"deap": DEAP_CHANNELS, "seed": SEED_CHANNELS}[name]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = HiSTN(channels=channels, regions=lobe_hemisphere_groups(channels), samples=200, num_classes=3).double().eval()
    b = HiSTN(channels=channels, regions=lobe_hemisphere_groups(channels), samples=200, num_classes=3,
              backend="torch").double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, len(channels), 200, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)
    assert a(x).shape == (4, 3)
