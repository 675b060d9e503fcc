"""Embedding cache, encoder wrapper, lexicon features and feature assembly."""

import warnings

import numpy as np
import pytest
from _text_support import CountingEncoder

from affectkit.text import FeatureExtractor, TextEncoder, clean_texts, lexicon_features
from affectkit.text.cache import EmbeddingCache, atomic_write_bytes
from affectkit.text.encoder import MAX_CHARS, TruncationWarning
from affectkit.text.lexicon import CATEGORIES, FEATURE_NAMES


def test_cache_hit_avoids_reencoding(tmp_path):
    fake = CountingEncoder()
    enc = TextEncoder(fake, cache_root=tmp_path, batch_size=2)
    first = enc.encode(["a b", "c d", "a b", "e f"])
    assert fake.texts_seen == 3, "duplicates inside one call are encoded once"
    assert np.array_equal(first[0], first[2])
    # A fresh encoder over the same cache folder (another process, a later run) reads the shards.
    fake2 = CountingEncoder()
    again = TextEncoder(fake2, cache_root=tmp_path).encode(["e f", "a b", "c d"])
    assert fake2.texts_seen == 0
    assert np.array_equal(again, first[[3, 0, 1]])
    TextEncoder(fake2, cache_root=tmp_path).encode(["a b", "new text"])
    assert fake2.texts_seen == 1


def test_cache_is_keyed_by_model(tmp_path):
    fake = CountingEncoder()
    TextEncoder(fake, cache_root=tmp_path).encode(["same text"])
    other = CountingEncoder()
    other.name = "another-model"
    TextEncoder(other, cache_root=tmp_path).encode(["same text"])
    assert other.texts_seen == 1


def test_without_cache_always_encodes(tmp_path):
    fake = CountingEncoder()
    enc = TextEncoder(fake, cache=False)
    enc.encode(["x"])
    enc.encode(["x"])
    assert fake.texts_seen == 2 and enc.calls == 2


def test_interrupted_and_corrupt_shards_do_not_poison_the_cache(tmp_path):
    cache = EmbeddingCache("m", tmp_path)
    TextEncoder(CountingEncoder(), cache=cache).encode(["kept"])

    def dies_midway(f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(cache.dir / "shard-interrupted.npz", dies_midway)
    assert sorted(p.name for p in cache.dir.iterdir() if "interrupted" in p.name) == []
    (cache.dir / "shard-garbage.npz").write_bytes(b"not a zip file")
    fake = CountingEncoder()
    out = TextEncoder(fake, cache=EmbeddingCache("m", tmp_path)).encode(["kept", "fresh"])
    assert fake.texts_seen == 1 and out.shape == (2, 8)


def test_clean_texts_rejects_and_truncates():
    with pytest.raises(ValueError, match="empty or whitespace-only string at position 1"):
        clean_texts(["fine", "   \n"])
    with pytest.raises(ValueError, match="position 0"):
        clean_texts("")
    with pytest.raises(TypeError, match="expected str items, got int at position 0"):
        clean_texts([3])
    with pytest.warns(TruncationWarning, match=f"truncated to {MAX_CHARS}"):
        out = clean_texts(["word " * 5000])
    assert len(out[0]) == MAX_CHARS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clean_texts("short") == ["short"]


def test_encoder_rejects_empty_input(tmp_path):
    enc = TextEncoder(CountingEncoder(), cache_root=tmp_path)
    with pytest.raises(ValueError, match="at least one text"):
        enc.encode([])


def test_lexicon_features_known_words():
    f = lexicon_features(["I am happy and joyful!", "xyzzy qwerty", "TERRIBLE awful fear?"])
    assert f.shape == (3, len(FEATURE_NAMES)) and f.dtype == np.float32
    joy, fear = CATEGORIES.index("joy"), CATEGORIES.index("fear")
    k = len(CATEGORIES)
    assert f[0, joy] > 0 and f[0, k + joy] == 1
    assert np.all(f[1, : 2 * k] == 0), "no lexicon word, no lexicon feature"
    assert f[2, fear] > 0
    assert f[0, FEATURE_NAMES.index("exclamations")] == 1 and f[2, FEATURE_NAMES.index("questions")] == 1
    assert f[2, FEATURE_NAMES.index("uppercase_share")] > 0.4


def test_feature_assembly(tmp_path):
    fx = FeatureExtractor(TextEncoder(CountingEncoder(dim=5), cache_root=tmp_path))
    x = fx(["I love it", "I hate it"])
    assert x.shape == (2, 5 + len(FEATURE_NAMES))
    assert np.allclose(np.linalg.norm(x[:, :5], axis=1), 1, atol=1e-5)
    assert np.array_equal(x[:, 5:], lexicon_features(["I love it", "I hate it"]))


def test_default_encoder_loads_offline(tmp_path):
    enc = TextEncoder(cache_root=tmp_path)
    v = enc.encode(["What a lovely surprise.", "What a lovely surprise."])
    assert v.shape == (2, 384) and enc.calls == 1
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
