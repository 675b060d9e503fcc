"""M2FNet and erc-meld on the fused attention against the same weights on stock PyTorch
(torch.nn.MultiheadAttention; scaled_dot_product_attention in the tuned encoder layers).

Shapes are MELD's: dialogues of 1..24 utterances (mean about 9.6), 13 word pieces per
utterance on average. `m2fnet` is the multimodal model (text 408-d, audio 128-d, visual 512-d
utterance features, width 256, 4 heads, 2 encoder and 2 fusion layers); `erc-meld` is the
shipped text model from the frozen encoder's token states on (its tuned MiniLM layers + M2FNet).

Floor: the attention here is tiny (a 10 x 10 score matrix per head and dialogue; 13 x 13 per
utterance in the encoder), so the linear layers dominate the arithmetic: per utterance about
2 * 1.77 M * 13 tokens * 2 layers = 92 MFLOP in the tuned encoder forward and ~3 MFLOP in
M2FNet, i.e. ~1 ms of arithmetic for a 10-utterance dialogue on one core. Both paths share
those layers; the attention path decides the difference (mask building, padding, dispatch).
"""

import pytest
import torch

from affectkit.models.m2fnet import M2FNet

from _devices import DEVICES

LENGTHS = [9, 14, 3, 1, 12, 7, 24, 10, 5, 8, 11, 6, 16, 2, 9, 13]  # a batch of 16 MELD-like dialogues


def _m2fnet(impl, device):
    torch.manual_seed(0)
    model = M2FNet(408, (128, 512), 7, d_model=256, num_heads=4, num_layers=2, fusion_layers=2, dropout=0.1)
    if impl == "torch":
        model = model.to_torch_attention()
    return model.to(device)


def _inputs(lengths, device):
    g = torch.Generator().manual_seed(1)
    B, L = len(lengths), max(lengths)
    feats = [torch.randn(B, L, d, generator=g).to(device) for d in (408, 128, 512)]
    speakers = torch.randint(0, 3, (B, L), generator=g).to(device)
    lengths_t = torch.tensor(lengths, device=device)
    target = torch.randint(0, 7, (sum(lengths),), generator=g).to(device)
    return feats, speakers, lengths_t, target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_m2fnet_train_step(bench, device, impl):
    model = _m2fnet(impl, device).train()
    (text, audio, visual), speakers, lengths, target = _inputs(LENGTHS, device)
    valid = torch.arange(text.shape[1], device=device)[None, :] < lengths[:, None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(text, speakers, lengths, [audio, visual])[valid], target)
        loss.backward()
        opt.step()
        return loss

    assert torch.isfinite(bench(f"m2fnet train step 16 dialogues {device}", impl, step))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_m2fnet_inference_one_dialogue(bench, device, impl):
    model = _m2fnet(impl, device).eval()
    (text, audio, visual), speakers, lengths, _ = _inputs([10], device)

    @torch.no_grad()
    def infer():
        return model(text, speakers, lengths, [audio, visual])

    assert bench(f"m2fnet inference 1 dialogue of 10 {device}", impl, infer).shape == (1, 10, 7)


@pytest.fixture(scope="module")
def erc_net():
    import affectkit

    return affectkit.load("erc-meld").net


def _token_states(lengths, g):
    counts = torch.randint(4, 23, (sum(lengths),), generator=g)  # word pieces per utterance, mean 13
    return [torch.randn(int(n), 384, generator=g) for n in counts]


def _erc(erc_net, impl):
    return erc_net if impl == "affectkit" else erc_net.to_torch_attention()


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_erc_meld_inference_one_dialogue(bench, erc_net, impl):
    from affectkit.models.erc import pack

    net = _erc(erc_net, impl).eval()
    g = torch.Generator().manual_seed(2)
    states = _token_states([10], g)
    lex = torch.rand(10, net.m2fnet.text_dim - 384, generator=g)
    speakers, lengths = pack([[0, 1] * 5])

    @torch.no_grad()
    def infer():
        return net(states, lex, speakers, lengths)

    assert bench("erc-meld inference 1 dialogue of 10 (tuned layers + M2FNet) cpu", impl, infer).shape == (1, 10, 7)


@pytest.mark.parametrize("impl", ["affectkit", "torch"])
def test_erc_meld_train_step(bench, erc_net, impl):
    import copy

    from affectkit.models.erc import pack

    net = copy.deepcopy(_erc(erc_net, impl)).train()
    g = torch.Generator().manual_seed(3)
    states = _token_states(LENGTHS, g)
    lex = torch.rand(sum(LENGTHS), net.m2fnet.text_dim - 384, generator=g)
    speakers, lengths = pack([[i % 3 for i in range(n)] for n in LENGTHS])
    target = torch.randint(0, 7, (sum(LENGTHS),), generator=g)
    valid = torch.arange(speakers.shape[1])[None, :] < lengths[:, None]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, foreach=True)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(states, lex, speakers, lengths)[valid], target)
        loss.backward()
        opt.step()
        return loss

    assert torch.isfinite(bench("erc-meld train step 16 dialogues cpu", impl, step))
