"""M2FNet: ragged dialogues through the fused kernel, the torch.nn.MultiheadAttention twin,
speaker numbering, the imbalance loss, compile, and bad input."""

import pytest
import torch
from torch.nn import functional as F

from affectkit.models.m2fnet import M2FNet, MAX_SPEAKERS, class_weights, focal_loss, speaker_ids


def _batch(gen, lengths, dims, dtype=torch.float64):
    B, L = len(lengths), max(lengths)
    text = torch.randn(B, L, dims[0], generator=gen, dtype=dtype)
    others = [torch.randn(B, L, d, generator=gen, dtype=dtype) for d in dims[1:]]
    speakers = torch.randint(0, 3, (B, L), generator=gen)
    return text, speakers, torch.tensor(lengths), others


def _model(gen, dims, **kw):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    kw = dict(dict(d_model=24, num_heads=4, num_layers=2, fusion_layers=2, dropout=0.1), **kw)
    return M2FNet(dims[0], dims[1:], 7, **kw).double().eval()


@pytest.mark.parametrize("dims", [(13,), (13, 5, 7)])
def test_padding_never_reaches_valid_utterances(gen, dims):
    model = _model(gen, dims)
    text, speakers, lengths, others = _batch(gen, [1, 7, 4], dims)
    out = model(text, speakers, lengths, others)
    assert out.shape == (3, 7, 7)
    garbage = [t.clone() for t in [text, *others]]
    for t in garbage:
        for b, n in enumerate(lengths.tolist()):
            t[b, n:] = torch.randn(t[b, n:].shape, generator=gen, dtype=t.dtype) * 1e3
    out2 = model(garbage[0], speakers, lengths, garbage[1:])
    torch.testing.assert_close(out, out2, rtol=1e-12, atol=1e-12)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(out[b, n:] == 0)
        # each dialogue alone gives the same logits as inside the padded batch
        alone = model(text[b:b + 1, :n], speakers[b:b + 1, :n], lengths[b:b + 1], [o[b:b + 1, :n] for o in others])
        torch.testing.assert_close(alone[0], out[b, :n], rtol=1e-10, atol=1e-10)


def test_context_changes_the_prediction(gen):
    """The dialogue encoder reads other utterances: changing utterance 0 moves utterance 2."""
    model = _model(gen, (13,))
    text, speakers, lengths, _ = _batch(gen, [4], (13,))
    out = model(text, speakers, lengths)
    text2 = text.clone()
    text2[0, 0] = torch.randn(13, generator=gen, dtype=text.dtype)  # (a constant shift would vanish in LayerNorm)
    assert (model(text2, speakers, lengths)[0, 2] - out[0, 2]).abs().max() > 1e-4


@pytest.mark.parametrize("dims", [(13,), (13, 5, 7)])
def test_torch_attention_twin_matches(gen, dims):
    model = _model(gen, dims)
    twin = model.to_torch_attention()
    assert not any(type(m).__name__ == "CrossModalAttention" for m in twin.modules())
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in twin.modules())
    text, speakers, lengths, others = _batch(gen, [5, 2, 3], dims)
    torch.testing.assert_close(model(text, speakers, lengths, others), twin(text, speakers, lengths, others),
                               rtol=1e-10, atol=1e-10)


def test_gradients_match_the_torch_twin(gen):
    model = _model(gen, (13,), dropout=0.0)
    twin = model.to_torch_attention()
    text, speakers, lengths, _ = _batch(gen, [5, 2, 3], (13,))
    target = torch.randint(0, 7, (int(lengths.sum()),), generator=gen)
    valid = torch.arange(5)[None, :] < lengths[:, None]
    grads = []
    for m in (model, twin):
        m.zero_grad()
        F.cross_entropy(m(text, speakers, lengths)[valid], target).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-8, atol=1e-10, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "encoders.0" in n and n.endswith("weight"))


def test_gradcheck_small(gen):
    model = _model(gen, (5, 3), d_model=8, num_heads=2, num_layers=1, fusion_layers=1, dropout=0.0)
    text, speakers, lengths, others = _batch(gen, [3, 2], (5, 3))
    text.requires_grad_(True)
    others[0].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, o: model(t, speakers, lengths, [o]), (text, others[0]))


def test_compiles_without_graph_breaks(gen):
    model = _model(gen, (13, 5), dropout=0.0).float()
    text, speakers, lengths, others = _batch(gen, [4, 6], (13, 5), torch.float32)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled(text, speakers, lengths, others), model(text, speakers, lengths, others),
                               rtol=1e-5, atol=1e-5)


def test_speaker_ids():
    assert speaker_ids(["Ross", "Rachel", "Ross", " Monica ", "Monica"]) == [0, 1, 0, 2, 2]
    many = [f"s{i}" for i in range(MAX_SPEAKERS + 3)]
    assert speaker_ids(many)[-4:] == [MAX_SPEAKERS - 1] * 4
    with pytest.raises(ValueError, match="speaker name.*position 1"):
        speaker_ids(["Ross", "  "])


def test_speaker_names_do_not_matter(gen):
    model = _model(gen, (13,))
    text, _, lengths, _ = _batch(gen, [4], (13,))
    a = torch.tensor([speaker_ids(["Joey", "Chandler", "Joey", "Phoebe"])])
    b = torch.tensor([speaker_ids(["Ann", "Zed", "Ann", "Unknown guest"])])
    torch.testing.assert_close(model(text, a, lengths), model(text, b, lengths))


def test_focal_loss_and_class_weights(gen):
    logits = torch.randn(11, 7, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 7, (11,), generator=gen)
    w = class_weights(torch.tensor([50, 10, 10, 5, 5, 1, 1]), 0.5).double()
    torch.testing.assert_close(focal_loss(logits, target, w), F.cross_entropy(logits, target, weight=w))
    assert abs(float(w.mean()) - 1) < 1e-6 and w[0] < w[1] < w[3] < w[5]
    p = F.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(focal_loss(logits, target, gamma=2.0), (-(1 - p) ** 2 * p.log()).mean())


def test_bad_input(gen):
    model = _model(gen, (13, 5))
    text, speakers, lengths, others = _batch(gen, [3, 2], (13, 5))
    with pytest.raises(ValueError, match="text: expected"):
        model(text[..., :4], speakers, lengths, others)
    with pytest.raises(ValueError, match="others: expected 1"):
        model(text, speakers, lengths, [])
    with pytest.raises(ValueError, match=r"others\[0\]: expected shape"):
        model(text, speakers, lengths, [others[0][:, :2]])
    with pytest.raises(ValueError, match="lengths: expected values"):
        model(text, speakers, torch.tensor([0, 2]), others)
    with pytest.raises(ValueError, match="lengths: expected values"):
        model(text, speakers, torch.tensor([4, 2]), others)
    with pytest.raises(ValueError, match="speakers: expected ids"):
        model(text, speakers + MAX_SPEAKERS, lengths, others)
    with pytest.raises(ValueError, match="speakers: expected a"):
        model(text, speakers.float(), lengths, others)
    with pytest.raises(ValueError, match="d_model"):
        M2FNet(13, d_model=10, num_heads=4)
