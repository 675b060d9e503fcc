"""The shipped text models: API, shapes, ranges, save/load, errors, and a real-data sanity check."""

import numpy as np
import pytest
from _text_support import SHARED, needs_shared

import affectkit
from affectkit.data import goemotions
from affectkit.models import NAMES, WEIGHTS_DIR, resolve

TEXTS = ["I can't believe you did this for me, thank you so much!",
         "This is the worst day. Everything went wrong and I'm furious.",
         "The meeting is at 3pm in room 204."]  # fmt: skip


@pytest.fixture(scope="module")
def emotion():
    return affectkit.load("text-emotion")


def test_shipped_weights_and_cards_exist():
    total = 0
    for name in NAMES:
        folder = WEIGHTS_DIR / name
        assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total < 40 * 2**20


def test_text_emotion_api(emotion):
    assert emotion.labels == goemotions.LABELS
    probs = emotion.predict_proba(TEXTS)
    assert probs.shape == (3, 28) and np.all((probs >= 0) & (probs <= 1))
    labels = emotion.predict(TEXTS)
    assert len(labels) == 3 and all(ls and set(ls) <= set(emotion.labels) for ls in labels)
    assert "gratitude" in labels[0]
    assert "neutral" in labels[2]
    ekman = emotion.predict_ekman(TEXTS)
    assert all(set(e) <= set(goemotions.EKMAN) for e in ekman) and "joy" in ekman[0] and "anger" in ekman[1]
    assert emotion.ekman_proba(probs).shape == (3, 7)
    assert 0.05 < emotion.temperature < 20 and emotion.thresholds.shape == (28,)


def test_long_inputs_run_in_chunks(emotion, monkeypatch):
    # The tuned encoder keeps one chunk of token states in memory at a time; chunking must
    # not change what comes out (texts of different lengths cross chunk boundaries).
    texts = TEXTS * 3 + ["ok", "A much longer text that goes on and on about the weather and lunch."]
    whole_logits, whole_embed = emotion.logits(texts), emotion.embed(texts)
    monkeypatch.setattr(emotion, "CHUNK", 2)
    np.testing.assert_allclose(emotion.logits(texts), whole_logits, atol=1e-4)
    np.testing.assert_allclose(emotion.embed(texts), whole_embed, atol=1e-5)
    assert whole_embed.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(whole_embed, axis=1), 1.0, rtol=1e-5)


def test_single_string_is_one_text(emotion):
    assert emotion.predict_proba("I am scared of the dark").shape == (1, 28)


def test_regression_models_api():
    vad = affectkit.load("vad")
    y = vad.predict(TEXTS)
    assert vad.targets == ("V", "A", "D") and y.shape == (3, 3) and np.all((y >= 1) & (y <= 5))
    assert y[0, 0] > y[1, 0], "thanks reads as more pleasant than fury"
    emp = affectkit.load("empathy")
    e = emp.predict(["Those poor families lost everything in the flood. My heart breaks for them."])
    assert emp.targets == ("empathy", "distress") and e.shape == (1, 2) and np.all((e >= 1) & (e <= 7))


def test_save_and_reload_round_trip(emotion, tmp_path):
    emotion.save(tmp_path)
    again = affectkit.load(str(tmp_path))
    assert np.allclose(again.predict_proba(TEXTS), emotion.predict_proba(TEXTS))
    assert again.predict(TEXTS) == emotion.predict(TEXTS)


def test_bad_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected one of \['text-emotion', 'vad', 'empathy', 'erc-meld'\]"):
        affectkit.load("no-such-model")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors model file"):
        affectkit.load(str(tmp_path))


def test_bad_texts_are_refused(emotion):
    with pytest.raises(ValueError, match="empty"):
        emotion.predict(["ok", ""])


def test_interrupted_save_keeps_the_old_model(emotion, tmp_path, monkeypatch):
    path = emotion.save(tmp_path)
    before = path.read_bytes()
    import affectkit.models.base as base

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save", boom)
    with pytest.raises(KeyboardInterrupt):
        base.save_weights(path, {}, {})
    assert path.read_bytes() == before and resolve(str(tmp_path)) == path


@needs_shared
def test_shipped_model_beats_trivial_baselines_on_dev_sample(emotion):
    from sklearn.metrics import f1_score

    dev = goemotions.load(SHARED, "dev").iloc[::27].head(200)  # a fixed sample
    y = goemotions.multi_hot(dev["labels"])
    pred = emotion.decide(emotion.predict_proba(list(dev["text"])))
    p = np.zeros_like(y)
    for i, labels in enumerate(pred):
        p[i, [emotion.labels.index(name) for name in labels]] = 1
    model_f1 = f1_score(y, p, average="macro", zero_division=0)
    neutral = np.zeros_like(y)
    neutral[:, goemotions.LABELS.index("neutral")] = 1
    everything = np.ones_like(y)
    baseline = max(f1_score(y, b, average="macro", zero_division=0) for b in (neutral, everything))
    assert model_f1 > baseline + 0.2, (model_f1, baseline)
