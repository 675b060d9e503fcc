"""`affectkit index build|search` and `affectkit analyze --explain` through the command line:
in-process with a fake encoder (fast), plus end-to-end subprocesses on the real data when present."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _retrieval_support import brute_force, fake_encoder, random_texts, rng_from, write_goemotions
from _text_support import SHARED, needs_shared

from affectkit import _index_cli, cli
from affectkit.data import goemotions
from affectkit.models import base


@pytest.fixture
def env(tmp_path, monkeypatch, gen):
    """Index CLI and the text models on a fake encoder; caches in tmp; no AFFECTKIT_DATA."""
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AFFECTKIT_DATA", raising=False)
    enc = fake_encoder(tmp_path / "cache", dim=384)
    monkeypatch.setattr(_index_cli, "make_encoder", lambda name: enc)
    monkeypatch.setitem(base._ENCODERS, "all-MiniLM-L6-v2", enc)  # what affectkit.load("text-emotion") uses
    return dict(tmp=tmp_path, enc=enc, rng=rng_from(gen))


def run(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _labelled_csv(path, rng, n=40):
    texts = random_texts(rng, n)
    labels = [str(rng.choice(["calm", "angry", "happy"])) for _ in texts]
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,text,mood\n")
        for i, (t, lab) in enumerate(zip(texts, labels)):
            f.write(f'{i},"{t}",{lab}\n')
    return texts, labels


def test_build_and_search_a_labelled_csv(env, capsys):
    texts, labels = _labelled_csv(env["tmp"] / "rows.csv", env["rng"])
    out = env["tmp"] / "moods.afk"
    code, stdout, err = run(capsys, "index", "build", "--file", str(env["tmp"] / "rows.csv"), "--label-column", "mood",
                            "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rows"] == 40 and summary["labels"] == sorted(set(labels)) and out.is_file()
    query = random_texts(env["rng"], 1)[0]
    code, stdout, err = run(capsys, "index", "search", str(out), query, "-k", "4", "--label", "angry", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["query"] == query and result["label"] == "angry" and result["k"] == 4
    want_rows, want_sims = brute_force(env["enc"], texts, query, np.array(labels) == "angry", k=4)
    assert [r["row"] for r in result["results"]] == want_rows
    np.testing.assert_allclose([r["similarity"] for r in result["results"]], want_sims, atol=1e-4)
    assert all(r["labels"] == ["angry"] and r["text"] == texts[r["row"]] for r in result["results"])
    code, stdout, _ = run(capsys, "index", "search", str(out), query)  # human-readable, no filter, k=5
    assert code == 0 and texts[brute_force(env["enc"], texts, query)[0][0]] in stdout


def test_build_from_jsonl_with_label_lists_and_plain_text(env, capsys):
    rng = env["rng"]
    texts = random_texts(rng, 12)
    lines = [json.dumps({"body": t, "tags": ["x", "y"] if i % 3 == 0 else ("y" if i % 3 == 1 else [])})
             for i, t in enumerate(texts)]
    (env["tmp"] / "rows.jsonl").write_text("\n".join(lines) + "\n")
    out = env["tmp"] / "j.afk"
    code, stdout, err = run(capsys, "index", "build", "-f", str(env["tmp"] / "rows.jsonl"), "--column", "body",
                            "--label-column", "tags", "-o", str(out), "--json")
    assert code == 0, err
    code, stdout, err = run(capsys, "index", "search", str(out), texts[5], "-k", "20", "--label", "x", "--json")
    rows = [r["row"] for r in json.loads(stdout)["results"]]
    assert code == 0 and sorted(rows) == [i for i in range(12) if i % 3 == 0]
    (env["tmp"] / "plain.txt").write_text("\n".join(texts[:5]) + "\n\n")
    code, stdout, err = run(capsys, "index", "build", "-f", str(env["tmp"] / "plain.txt"), "-o", str(out), "--json")
    assert code == 0 and json.loads(stdout)["rows"] == 5 and json.loads(stdout)["labels"] is None
    code, stdout, _ = run(capsys, "index", "search", str(out), texts[2], "-k", "1", "--json")
    assert json.loads(stdout)["results"][0]["text"] == texts[2]  # a stored text finds itself first


def test_build_from_a_corpus(env, capsys):
    texts, labels = write_goemotions(env["tmp"] / "data", env["rng"], n=60)
    out = env["tmp"] / "ge.afk"
    code, stdout, err = run(capsys, "index", "build", "--corpus", "goemotions", "--data", str(env["tmp"] / "data"),
                            "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["rows"] == 60
    code, stdout, _ = run(capsys, "index", "search", str(out), "anything", "-k", "60", "--label", "grief", "--json")
    grief = goemotions.LABELS.index("grief")
    assert sorted(r["row"] for r in json.loads(stdout)["results"]) == [i for i, ls in enumerate(labels) if grief in ls]


@pytest.mark.parametrize("case, message", [
    ("missing file", "does not exist"),
    ("missing column", "expected a column named 'text'"),
    ("missing label column", "expected a column named 'feeling'"),
    ("header only", "no rows in it"),
    ("empty text", "the text is empty"),
    ("empty plain file", "no rows in it"),
    ("labels on plain text", "--label-column needs a .csv or .jsonl"),
    ("bad json", "not valid JSON"),
    ("non-utf8", "not UTF-8"),
    ("both sources", "either --file FILE or --corpus NAME"),
    ("no source", "either --file FILE or --corpus NAME"),
    ("out folder missing", "does not exist"),
    ("corpus missing", "--corpus goemotions: goemotions: no train.tsv"),
])
def test_build_bad_input(env, capsys, case, message):
    tmp = env["tmp"]
    files = {"missing column": ("a.csv", b"id,body\n1,hi\n"), "missing label column": ("a.csv", b"text\nhi\n"),
             "header only": ("a.csv", b"text,mood\n"), "empty text": ("a.csv", b"text\nhello\n  \n"),
             "empty plain file": ("a.txt", b"\n \n"), "labels on plain text": ("a.txt", b"hello\n"),
             "bad json": ("a.jsonl", b'{"text": "hi"\n'), "non-utf8": ("a.csv", b"text\ncaf\xe9\n")}
    name, content = files.get(case, ("a.csv", b"text\nhello\n"))
    (tmp / name).write_bytes(content)
    out = tmp / ("nowhere/x.afk" if case == "out folder missing" else "x.afk")
    args = ["index", "build", "--out", str(out)]
    if case == "missing file":
        args += ["--file", str(tmp / "absent.csv")]
    elif case == "both sources":
        args += ["--file", str(tmp / name), "--corpus", "goemotions"]
    elif case == "corpus missing":
        args += ["--corpus", "goemotions", "--data", str(tmp)]
    elif case != "no source":
        args += ["--file", str(tmp / name)]
    if case in ("missing label column", "labels on plain text"):
        args += ["--label-column", "feeling"]
    code, stdout, err = run(capsys, *args)
    assert code == 2 and message in err and err.startswith("error: "), (code, err)
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize("case, message", [
    ("k zero", "-k: expected a positive number"),
    ("k negative", "-k: expected a positive number"),
    ("unknown label", "label: expected one of"),
    ("no labels", "this index has no labels"),
    ("empty query", "the query is empty"),
    ("missing index", "does not exist"),
    ("not an index", "not an affectkit index"),
    ("corrupted index", "checksum mismatch"),
])
def test_search_bad_input(env, capsys, case, message):
    tmp = env["tmp"]
    texts, _ = _labelled_csv(tmp / "rows.csv", env["rng"], n=5)
    label_args = ["--label-column", "mood"] if case != "no labels" else []
    assert run(capsys, "index", "build", "-f", str(tmp / "rows.csv"), "-o", str(tmp / "i.afk"), *label_args)[0] == 0
    path, query, extra = tmp / "i.afk", "a query", []
    if case == "k zero":
        extra = ["-k", "0"]
    elif case == "k negative":
        extra = ["-k", "-3"]
    elif case in ("unknown label", "no labels"):
        extra = ["--label", "sleepy"]
    elif case == "empty query":
        query = "  "
    elif case == "missing index":
        path = tmp / "absent.afk"
    elif case == "not an index":
        path = tmp / "rows.csv"
    elif case == "corrupted index":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x55
        path.write_bytes(bytes(blob))
    code, stdout, err = run(capsys, "index", "search", str(path), query, *extra)
    assert code == 2 and message in err and err.startswith("error: "), (code, err)
    assert stdout == ""


def test_analyze_explain_json_and_table(env, capsys):
    texts, labels = write_goemotions(env["tmp"] / "data", env["rng"], n=200)
    talk = env["tmp"] / "talk.txt"
    talk.write_text("Ann: I lost my keys again.\nBo: Oh no, that's so annoying!\nAnn: Found them, what a relief.\n")
    code, stdout, err = run(capsys, "analyze", "--file", str(talk), "--explain", "--data", str(env["tmp"] / "data"),
                            "--json", "--no-vad")
    assert code == 0, err
    out = json.loads(stdout)
    for u in out["utterances"]:
        near = u["nearest_examples"]
        assert near["emotion"] == u["emotions"][0]
        assert len(near["examples"]) == 3
        for e in near["examples"]:
            assert near["emotion"] in e["labels"] and e["text"] == texts[e["row"]]
            assert set(e) == {"row", "text", "similarity", "labels"}
        sims = [e["similarity"] for e in near["examples"]]
        assert sims == sorted(sims, reverse=True)
    code, stdout, err = run(capsys, "analyze", "--file", str(talk), "--explain", "--data", str(env["tmp"] / "data"),
                            "--no-vad")
    assert code == 0, err
    assert "nearest training examples of the same emotion" in stdout
    first = out["utterances"][0]["nearest_examples"]["examples"][0]["text"]
    assert first.split()[0] in stdout
    code, stdout, _ = run(capsys, "analyze", "--file", str(talk), "--json", "--no-vad")  # no --explain: no field
    assert all("nearest_examples" not in u for u in json.loads(stdout)["utterances"])


def test_analyze_explain_without_data_fails_clearly(env, capsys):
    code, stdout, err = run(capsys, "analyze", "I am happy", "--explain", "--no-vad", "--json")
    assert code == 2 and stdout == ""
    assert "--explain needs the GoEmotions training data: pass --data DIR or set AFFECTKIT_DATA" in err
    code, _, err = run(capsys, "analyze", "I am happy", "--explain", "--no-vad", "--data", str(env["tmp"] / "none"))
    assert code == 2 and "--explain needs the GoEmotions training data" in err


@needs_shared
def test_analyze_explain_end_to_end_on_the_real_data():
    env = dict(os.environ, AFFECTKIT_DATA=str(SHARED))
    proc = subprocess.run([sys.executable, "-m", "affectkit", "analyze", "Thank you so much, this made my day!",
                           "--explain", "--json", "--no-vad"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["utterances"]
    near = row["nearest_examples"]
    assert near["emotion"] == row["emotions"][0] and len(near["examples"]) == 3
    assert all(near["emotion"] in e["labels"] for e in near["examples"])
