"""Corpus loaders: the real shared copies (when present) and small files written here."""

from pathlib import Path

import numpy as np
import pytest

from affectkit.data import data_root, emobank, empathic_reactions, goemotions, meld

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared corpora not found at {SHARED}")


@needs_shared
def test_real_corpora_shapes():
    # Row counts documented in shared/data/README.md.
    assert len(goemotions.load(SHARED, "train")) == 43_410
    assert len(goemotions.load(SHARED / "goemotions", "dev")) == 5_426
    train = meld.load(SHARED, "train")
    assert len(train) == 9_989 and len(meld.dialogues(train)) == 1_038
    assert set(train["emotion"]) == set(meld.LABELS)
    assert len(emobank.load(SHARED, "train")) == 8_062 and len(emobank.load(SHARED, "dev")) == 1_000
    essays = empathic_reactions.load(SHARED)
    assert len(essays) == 1_485 and essays["empathy"].between(1, 7).all()


@needs_shared
def test_meld_dialogues_are_ordered():
    for d in meld.dialogues(meld.load(SHARED, "dev"))[:50]:
        assert len(d.speakers) == len(d.texts) == len(d.emotions) == len(d) >= 1
    df = meld.load(SHARED, "dev")
    assert (df.groupby("dialogue_id")["utterance_id"].apply(lambda s: s.is_monotonic_increasing)).all()


def test_goemotions_small_file(tmp_path):
    (tmp_path / "train.tsv").write_text('so "happy" today\t17,0\tabc\nmeh\t27\tdef\n')
    df = goemotions.load(tmp_path)
    assert list(df["text"]) == ['so "happy" today', "meh"]
    assert list(df["labels"]) == [(0, 17), (27,)]
    m = goemotions.multi_hot(df["labels"])
    assert m.shape == (2, 28) and m.sum() == 3 and m[0, 17] == 1 and m[1, 27] == 1
    ekman = goemotions.multi_hot(df["labels"]) @ goemotions.ekman_matrix()
    assert ekman[1, list(goemotions.EKMAN).index("neutral")] == 1
    assert np.all(goemotions.ekman_matrix().sum(1) == 1), "every label belongs to exactly one Ekman group"


@pytest.mark.parametrize(
    "content, match",
    [("text\t28\tid\n", r"label ids must lie in \[0, 27\]"), ("text\tjoy\tid\n", "comma-separated label ids")],
)
def test_goemotions_bad_labels(tmp_path, content, match):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(ValueError, match=match):
        goemotions.load(tmp_path)


def test_missing_files_and_columns(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="meld: no test_sent_emo.csv"):
        meld.load(tmp_path, "test")
    (tmp_path / "emobank_train_dev.csv").write_text("id,split,V,A,text\n1,train,3,3,hi\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['D'\]"):
        emobank.load(tmp_path)
    monkeypatch.delenv("AFFECTKIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="AFFECTKIT_DATA"):
        data_root()
    monkeypatch.setenv("AFFECTKIT_DATA", str(tmp_path))
    assert data_root() == tmp_path


def test_emobank_unknown_split(tmp_path):
    (tmp_path / "emobank_train_dev.csv").write_text("id,split,V,A,D,text\n1,train,3,3,3,hi\n")
    assert len(emobank.load(tmp_path, "train")) == 1
    with pytest.raises(ValueError, match=r"split: expected one of \['train'\]"):
        emobank.load(tmp_path, "test")


def test_non_utf8_file(tmp_path):
    (tmp_path / "messages_train.csv").write_bytes(b"message_id,essay,empathy,distress\n1,caf\xe9 \xff,3,4\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        empathic_reactions.load(tmp_path)


def test_meld_unknown_emotion(tmp_path):
    (tmp_path / "train_sent_emo.csv").write_text(
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID\n1,hi,A,bored,neutral,0,0\n"
    )
    with pytest.raises(ValueError, match=r"unknown emotion\(s\) \['bored'\]"):
        meld.load(tmp_path)
