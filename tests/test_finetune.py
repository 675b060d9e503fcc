"""Fine-tuning the encoder's top layers with a text model's head (affectkit.models.finetune)."""

import numpy as np
import pytest
import torch

from affectkit.models.base import Head
from affectkit.models.finetune import TunedTextNet, finetune, frozen_states, run_net
from affectkit.text.lexicon import lexicon_features
from affectkit.text.utterance_encoder import UtteranceEncoder

HAPPY = ["what a lovely morning", "I adore these people", "best gift ever, thanks", "we won the final!",
         "so glad you are here", "this made me smile"]
ANGRY = ["I am sick of your lies", "this service is a disgrace", "stop shouting at me", "they cheated us again",
         "I hate this stupid queue", "how dare you touch that"]


def _problem():
    texts = HAPPY + ANGRY
    y = np.zeros((len(texts), 2), dtype=np.float32)
    y[: len(HAPPY), 0] = 1
    y[len(HAPPY):, 1] = 1
    enc = UtteranceEncoder(tuned_layers=1, dropout=0.0)
    states, lex = frozen_states(enc, texts), lexicon_features(texts)
    head = Head(enc.dim + lex.shape[1], 2, 16, 0.0)
    net = TunedTextNet(enc, head)
    with torch.no_grad():
        head.set_standardisation(np.hstack([net.embed(states).numpy(), lex]))
    return net, (states, lex, y, None)


def _fit(net, data, scores, **kw):
    seen = []

    def score(out):  # a fixed sequence of dev scores: the epoch to keep is known in advance
        seen.append(out)
        return scores[len(seen) - 1]

    opts = dict(loss="bce", score=score, lr=1e-2, encoder_lr=1e-3, weight_decay=0.0, epochs=len(scores), batch=4)
    info = finetune(net, data, data, **{**opts, **kw})
    return info, seen


def test_finetune_keeps_the_best_epoch_and_trains_the_encoder():
    torch.manual_seed(0)
    net, data = _problem()
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    info, seen = _fit(net, data, [0.1, 0.9, 0.5])
    assert info["dev_score_per_epoch"] == [0.1, 0.9, 0.5] and info["best_epoch"] == 2
    # The restored weights are epoch 2's: they reproduce its dev outputs exactly.
    np.testing.assert_array_equal(run_net(net, data[0], data[1]), seen[1])
    assert not np.array_equal(seen[1], seen[2])
    changed = [k for k, v in net.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the tuned encoder layers must learn"
    # The task is learnable: the kept epoch separates the two classes on its training rows.
    assert (seen[1].argmax(1) == data[2].argmax(1)).mean() == 1.0


def test_finetune_with_zero_encoder_rate_leaves_the_encoder_untouched():
    torch.manual_seed(0)
    net, data = _problem()
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    _fit(net, data, [0.0, 1.0], encoder_lr=0.0)
    assert all(torch.equal(v, before[k]) for k, v in net.encoder.state_dict().items())


def test_tuned_embedding_is_the_normalised_pooled_vector():
    net, (states, lex, _, _) = _problem()
    net.eval()
    with torch.no_grad():
        emb = net.embed(states)
        pooled = net.encoder.pool(states)
    torch.testing.assert_close(emb, pooled / pooled.norm(dim=1, keepdim=True))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(states)))


@pytest.mark.parametrize("hidden", [0, 8])
def test_head_sees_embedding_then_lexicon(hidden):
    net, (states, lex, _, _) = _problem()
    net.head = Head(net.encoder.dim + lex.shape[1], 2, hidden, 0.0).eval()
    out = run_net(net, states, lex, batch=5)  # batches of 5: rows must stay in order across batches
    with torch.no_grad():
        expect = net.head(torch.cat([net.embed(states), torch.from_numpy(lex)], 1)).double().numpy()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


def test_frozen_states_with_a_progress_bar_match_without():
    enc = UtteranceEncoder(tuned_layers=1)
    texts = HAPPY + ANGRY
    quiet, shown = frozen_states(enc, texts, step=5), frozen_states(enc, texts, progress=True, step=5)
    assert len(shown) == len(texts)
    for a, b in zip(quiet, shown):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
