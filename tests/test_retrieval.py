"""model.nearest_examples and the cached training-corpus index (affectkit.retrieval), on fake
corpora with a fake encoder (checked against brute-force numpy) and, when present, the real data."""

import json

import numpy as np
import pytest
from _retrieval_support import brute_force, fake_encoder, random_texts, rng_from, write_emobank, write_goemotions
from _text_support import SHARED, needs_shared

from affectkit import models
from affectkit.data import goemotions
from affectkit.index import IndexFormatError
from affectkit.retrieval import TextIndex, TrainingDataMissing, training_index
from affectkit.retrieval.blending import blend, cross_fitted_blending, label_values, neighbour_means
from affectkit.retrieval.text_index import Example
from affectkit.text import TextEncoder
from affectkit.text.features import FeatureExtractor


@pytest.fixture
def setup(tmp_path, monkeypatch, gen):
    """A fake GoEmotions + EmoBank corpus, the index cache in tmp, and the shipped models on a fake encoder."""
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AFFECTKIT_DATA", raising=False)
    rng = rng_from(gen)
    data = tmp_path / "data"
    texts, labels = write_goemotions(data, rng)
    vad_texts, vad_gold = write_emobank(data, rng)
    encoder = fake_encoder(tmp_path / "cache")
    emo = models.load("text-emotion", features=FeatureExtractor(encoder))
    return dict(data=data, texts=texts, labels=labels, vad_texts=vad_texts, vad_gold=vad_gold, encoder=encoder,
                emo=emo, rng=rng, tmp=tmp_path)


def _index_files(tmp):
    return sorted((tmp / "cache" / "index").glob("*.afk"))


def test_neighbours_share_the_predicted_emotion_and_are_the_nearest_of_those(setup):
    s = setup
    emo, enc = s["emo"], s["encoder"]
    queries = random_texts(s["rng"], 6)
    found = emo.nearest_examples(queries, k=4, data=s["data"])
    predicted = emo.predict(queries)
    assert len(found) == len(queries)
    for q, pred, row in zip(queries, predicted, found):
        emotion = pred[0]  # the most probable predicted emotion
        carries = np.array([goemotions.LABELS.index(emotion) in ls for ls in s["labels"]])
        want_rows, want_sims = brute_force(enc, s["texts"], q, carries, k=4)
        assert [e["row"] for e in row] == want_rows
        np.testing.assert_allclose([e["similarity"] for e in row], want_sims, atol=1e-4)
        for e in row:
            assert emotion in e["labels"]
            assert e["text"] == s["texts"][e["row"]]
            assert sorted(e["labels"]) == sorted(goemotions.LABELS[i] for i in s["labels"][e["row"]])
        json.dumps(row)  # JSON-ready


def test_without_the_emotion_filter_the_nearest_of_all(setup):
    s = setup
    q = random_texts(s["rng"], 1)[0]
    (row,) = s["emo"].nearest_examples([q], k=5, same_emotion=False, data=s["data"])
    want_rows, want_sims = brute_force(s["encoder"], s["texts"], q, None, k=5)
    assert [e["row"] for e in row] == want_rows
    np.testing.assert_allclose([e["similarity"] for e in row], want_sims, atol=1e-4)


def test_explicit_emotions_and_more_k_than_matches(setup):
    s = setup
    counts = np.zeros(len(goemotions.LABELS), int)
    for ls in s["labels"]:
        counts[list(ls)] += 1
    rare = goemotions.LABELS[int(np.argmin(counts))]
    q = random_texts(s["rng"], 2)
    found = s["emo"].nearest_examples(q, k=int(counts.min()) + 10, emotions=[rare, "joy"], data=s["data"])
    assert len(found[0]) == counts.min() and all(rare in e["labels"] for e in found[0])
    assert all("joy" in e["labels"] for e in found[1])


def test_vad_neighbours_carry_gold_scores(setup, tmp_path):
    s = setup
    vad = models.load("vad", features=FeatureExtractor(s["encoder"]))
    q = random_texts(s["rng"], 3)
    found = vad.nearest_examples(q, k=3, data=s["data"])
    for query, row in zip(q, found):
        want_rows, want_sims = brute_force(s["encoder"], s["vad_texts"], query, None, k=3)
        assert [e["row"] for e in row] == want_rows
        np.testing.assert_allclose([e["similarity"] for e in row], want_sims, atol=1e-4)
        for e in row:
            assert e["text"] == s["vad_texts"][e["row"]]
            np.testing.assert_allclose([e["scores"][d] for d in "VAD"], s["vad_gold"][e["row"]], atol=1e-4)


def test_second_use_loads_the_cache_instead_of_rebuilding(setup, monkeypatch):
    s = setup
    q = random_texts(s["rng"], 2)
    first = s["emo"].nearest_examples(q, data=s["data"])
    (path,) = _index_files(s["tmp"])
    stamp = path.stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("the index was rebuilt although a valid cache file exists")

    monkeypatch.setattr(TextIndex, "build", no_build)
    fresh = models.load("text-emotion", features=FeatureExtractor(s["encoder"]))  # no in-memory index
    assert fresh.nearest_examples(q, data=s["data"]) == first
    assert path.stat().st_mtime_ns == stamp and _index_files(s["tmp"]) == [path]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupted_cache_file_is_rebuilt(setup, damage):
    s = setup
    q = random_texts(s["rng"], 2)
    first = s["emo"].nearest_examples(q, data=s["data"])
    (path,) = _index_files(s["tmp"])
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 3]
    else:
        blob = bytearray(b"not an index at all")
    path.write_bytes(bytes(blob))
    with pytest.raises(IndexFormatError):
        TextIndex.load(path)
    fresh = models.load("text-emotion", features=FeatureExtractor(s["encoder"]))
    with pytest.warns(UserWarning, match="rebuilding the retrieval index cache"):
        again = fresh.nearest_examples(q, data=s["data"])
    assert again == first
    assert len(TextIndex.load(path)) == len(s["texts"])  # a valid file again


def test_a_changed_corpus_gets_its_own_index(setup):
    s = setup
    s["emo"].nearest_examples(["hello there"], data=s["data"])
    texts, labels = write_goemotions(s["data"], s["rng"], n=80)
    fresh = models.load("text-emotion", features=FeatureExtractor(s["encoder"]))
    (row,) = fresh.nearest_examples(["hello there"], k=80, same_emotion=False, data=s["data"])
    assert len(row) == 80 and all(e["text"] == texts[e["row"]] for e in row)
    assert len(_index_files(s["tmp"])) == 2


def test_missing_training_data_is_a_clear_error(setup):
    s = setup
    with pytest.raises(TrainingDataMissing, match="GoEmotions training data .* pass data=DIR or set AFFECTKIT_DATA"):
        s["emo"].nearest_examples(["hello"])
    with pytest.raises(TrainingDataMissing, match="GoEmotions training data"):
        s["emo"].nearest_examples(["hello"], data=s["tmp"] / "nowhere")
    vad = models.load("vad", features=FeatureExtractor(s["encoder"]))
    with pytest.raises(TrainingDataMissing, match="EmoBank training data"):
        vad.nearest_examples(["hello"], data=s["tmp"] / "nowhere")
    assert issubclass(TrainingDataMissing, FileNotFoundError)  # the CLI's error handling relies on it


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k: expected a positive int"),
    (dict(k=-2), "k: expected a positive int"),
    (dict(k=True), "k: expected a positive int"),
    (dict(k=2.5), "k: expected a positive int"),
    (dict(emotions=["joy", "joy"]), "emotions: expected one emotion per text"),
    (dict(emotions=["happyness"]), "emotions: expected labels from"),
])
def test_bad_arguments(setup, kwargs, message):
    s = setup
    with pytest.raises(ValueError, match=message):
        s["emo"].nearest_examples(["some text"], data=s["data"], **kwargs)


def test_bad_texts(setup):
    with pytest.raises(ValueError, match="non-empty text"):
        setup["emo"].nearest_examples(["fine", "   "], data=setup["data"])
    with pytest.raises(TypeError, match="expected str items"):
        setup["emo"].nearest_examples([3], data=setup["data"])


# ---- TextIndex ------------------------------------------------------------------------------------
def test_text_index_round_trip_and_label_filter(tmp_path, gen):
    rng = rng_from(gen)
    enc = fake_encoder(tmp_path / "cache", dim=16)
    texts = random_texts(rng, 50) + ["café ünïcode ✓ and a\ttab"]
    labels = [list(rng.choice(["a", "b", "c"], size=rng.integers(0, 3), replace=False)) for _ in texts]
    scores = rng.normal(size=(len(texts), 2))
    index = TextIndex.build(texts, enc, labels=labels, score_names=["x", "y"], scores=scores, source="test")
    index.save(tmp_path / "i.afk")
    back = TextIndex.load(tmp_path / "i.afk")
    assert back.texts == texts and back.label_names == ["a", "b", "c"] and back.source == "test"
    np.testing.assert_array_equal(back.label_matrix, index.label_matrix)
    np.testing.assert_allclose(back.scores, scores.astype(np.float32))
    q = random_texts(rng, 1)
    (row,) = back.search(q, 7, encoder=enc, labels="b")
    allowed = np.array(["b" in ls for ls in labels])
    want_rows, want_sims = brute_force(enc, texts, q[0], allowed, k=7)
    assert [e.row for e in row] == want_rows
    np.testing.assert_allclose([e.similarity for e in row], want_sims, atol=1e-5)
    assert all(isinstance(e, Example) and "b" in e.labels for e in row)
    with pytest.raises(ValueError, match=r"label: expected one of \['a', 'b', 'c'\], got 'z'"):
        back.search(q, 3, encoder=enc, labels="z")
    assert back.search(q, 3, encoder=enc, labels="z", strict=False) == [[]]


def test_text_index_bad_input(tmp_path):
    enc = fake_encoder(tmp_path / "cache", dim=8)
    with pytest.raises(ValueError, match="at least one text"):
        TextIndex.build([], enc)
    with pytest.raises(ValueError, match="labels: expected one label set per text"):
        TextIndex.build(["a", "b"], enc, labels=[["x"]])
    index = TextIndex.build(["a", "b"], enc)
    with pytest.raises(ValueError, match="this index has no labels"):
        index.search(["a"], 1, encoder=enc, labels="x")
    with pytest.raises(ValueError, match="k: expected a positive int"):
        index.search(["a"], 0, encoder=enc)
    with pytest.raises(ValueError, match="built with"):
        index.search(["a"], 1, encoder=TextEncoder("other-model", cache=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextIndex.load(tmp_path / "missing.afk")
    (tmp_path / "bad.afk").write_bytes(b"\0" * 100)
    with pytest.raises(IndexFormatError):
        TextIndex.load(tmp_path / "bad.afk")


# ---- blending -------------------------------------------------------------------------------------
def test_blend_and_neighbour_means(gen):
    rng = rng_from(gen)
    p, q = rng.uniform(size=(5, 3)), rng.uniform(size=(5, 3))
    np.testing.assert_allclose(blend(p, q, 0.25), 0.75 * p + 0.25 * q)
    with pytest.raises(ValueError, match="alpha"):
        blend(p, q, 1.5)
    values = rng.normal(size=(10, 2))
    rows = np.stack([rng.permutation(10)[:4] for _ in range(3)])
    means = neighbour_means(values, rows, (1, 4))
    np.testing.assert_allclose(means[1], values[rows[:, 0]])
    np.testing.assert_allclose(means[4], values[rows].mean(axis=1))
    with pytest.raises(ValueError, match="too small"):
        neighbour_means(values, np.array([[0, -1]]), (2,))


def test_cross_fitted_blending_picks_an_informative_neighbour_signal(gen):
    from scipy.stats import pearsonr

    rng = rng_from(gen)
    y = rng.normal(size=(400, 1))
    model = y + rng.normal(scale=2.0, size=y.shape)  # weak model
    knn = {5: y + rng.normal(scale=0.3, size=y.shape), 10: rng.normal(size=y.shape)}  # k=5 informative, k=10 noise

    def r(p, fit, rows):
        return pearsonr(p[rows, 0], y[rows, 0])[0]

    out = cross_fitted_blending(model, knn, r, alphas=(0.0, 0.5, 0.9))
    assert out["blended"] > out["model_alone"] + 0.2
    assert all(c["k"] == 5 and c["alpha"] > 0 for c in out["chosen"])


def test_label_values_orders_columns_by_the_model(tmp_path):
    enc = fake_encoder(tmp_path / "cache", dim=8)
    index = TextIndex.build(["a", "b"], enc, labels=[["joy"], ["anger", "joy"]])
    np.testing.assert_array_equal(label_values(index, ("anger", "fear", "joy")), [[0, 0, 1], [1, 0, 1]])


def test_blending_measurements_on_fake_corpora(setup):
    """The a = 0 arm is exactly the model under the cross-fitted protocol of training (cross_fitted_f1)."""
    from scipy.stats import pearsonr
    from sklearn.model_selection import KFold

    from sklearn.metrics import f1_score

    from affectkit.models.calibration import choose_thresholds, decide
    from affectkit.retrieval.blending import measure_text_emotion, measure_vad

    s = setup
    dev_texts, dev_labels = write_goemotions(s["data"], s["rng"], n=80, split="dev")
    grid = np.array([0.05, 0.2, 0.5])  # a coarse grid keeps the test fast
    out = measure_text_emotion(s["emo"], s["data"], ks=(3, 7), alphas=(0.0, 0.3), threshold_grid=grid)
    probs, y = s["emo"].predict_proba(dev_texts), goemotions.multi_hot(dev_labels)
    want = []
    for fit, held in KFold(2, shuffle=True, random_state=0).split(probs):
        th = choose_thresholds(probs[fit], y[fit], grid)
        want.append(f1_score(y[held], decide(probs[held], th), average="macro", zero_division=0))
    assert out["model_alone"] == pytest.approx(np.mean(want), abs=1e-9)
    assert all(c["k"] in (3, 7) and c["alpha"] in (0.0, 0.3) for c in out["chosen"]) and 0 <= out["blended"] <= 1

    vad_texts, _ = write_emobank(s["data"], s["rng"], n=60, n_dev=30)
    vad = models.load("vad", features=FeatureExtractor(s["encoder"]))
    out = measure_vad(vad, s["data"], ks=(2, 4), alphas=(0.0, 0.5))
    from affectkit.data import emobank

    dev = emobank.load(s["data"], "dev")
    pred, gold = vad.predict(list(dev["text"])), dev[["V", "A", "D"]].to_numpy()
    for j, d in enumerate("VAD"):
        halves = KFold(2, shuffle=True, random_state=0).split(pred)
        want = np.mean([pearsonr(pred[h, j], gold[h, j])[0] for _, h in halves])
        assert out["dimensions"][d]["model_alone"] == pytest.approx(want, abs=1e-9)


# ---- real data ------------------------------------------------------------------------------------
@needs_shared
def test_real_goemotions_neighbours():
    import affectkit

    emo = affectkit.load("text-emotion")
    queries = ["Thank you so much, this made my day!", "I am furious about what they did."]
    found = emo.nearest_examples(queries, k=3, data=SHARED)
    for pred, row in zip(emo.predict(queries), found):
        assert len(row) == 3 and all(pred[0] in e["labels"] for e in row)
        sims = [e["similarity"] for e in row]
        assert sims == sorted(sims, reverse=True) and sims[0] > 0.4
    index = training_index("goemotions", emo.features.encoder, SHARED)
    assert len(index) == len(goemotions.load(SHARED, "train"))
