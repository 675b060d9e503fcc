"""`affectkit analyze | train | evaluate` through the real command line (subprocesses)."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, cache=None):
    env = dict(os.environ)
    if cache is not None:
        env["AFFECTKIT_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "affectkit", *args], capture_output=True, text=True, env=env)


def test_analyze_one_text_json():
    proc = _run("analyze", "Thank you so much, this made my day!", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    (row,) = out["utterances"]
    assert len(row["top"]) == 3 and row["emotions"] and 0 <= row["top"][0]["probability"] <= 1
    assert row["top"][0]["probability"] >= row["top"][1]["probability"]
    assert set(row["vad"]) == {"valence", "arousal", "dominance"} and 1 <= row["vad"]["valence"] <= 5


def test_analyze_files(tmp_path):
    dialogue = tmp_path / "talk.txt"
    dialogue.write_text("Ann: I lost my keys again.\nBo: Oh no, that's so annoying!\nAnn: Found them, what a relief.\n")
    table = tmp_path / "rows.csv"
    table.write_text('id,text\n1,"I love this, wow"\n2,I am scared\n')
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "so sad today", "id": 3}\n"plain string line"\n')
    for path, kind, n in ((dialogue, "dialogue", 3), (table, "csv", 2), (lines, "jsonl", 2)):
        proc = _run("analyze", "--file", str(path), "--json", "--top", "2", "--no-vad")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["kind"] == kind and len(out["utterances"]) == n
        assert all(len(u["top"]) == 2 and "vad" not in u for u in out["utterances"])
    out = json.loads(_run("analyze", "--file", str(dialogue), "--json", "--no-vad").stdout)
    assert [s["speaker"] for s in out["speakers"]] == ["Ann", "Bo"] and out["speakers"][0]["utterances"] == 2


def test_analyze_bundled_example_human_output():
    proc = _run("analyze", "--example")
    assert proc.returncode == 0, proc.stderr
    assert "Maya" in proc.stdout and "per speaker" in proc.stdout and "in context" in proc.stdout


@pytest.mark.parametrize(
    "args, content, message",
    [
        (("",), None, "the text is empty"),
        (("   ",), None, "the text is empty"),
        (("--file", "{f}"), b"caf\xe9 au lait\n", "not UTF-8"),
        (("--file", "{f}.csv"), b"id,body\n1,hello\n", "expected a column named 'text'"),
        (("--file", "{f}.csv"), b"text\n   \n", "the text is empty"),
        (("--file", "{f}.jsonl"), b'{"body": 1}\n', "expected an object with a 'text' field"),
        (("--file", "{f}"), b"\n  \n", "no text in it"),
        (("--file", "{f}-missing"), None, "does not exist"),
        (("hello", "--model", "no-such-model"), None, "expected one of"),
        (("hello", "--top", "0"), None, "positive number"),
    ],
)
def test_analyze_bad_input(tmp_path, args, content, message):
    f = tmp_path / "input"
    args = [a.replace("{f}", str(f)) for a in args]
    if content is not None:
        target = args[args.index("--file") + 1]
        with open(target, "wb") as fh:
            fh.write(content)
    proc = _run("analyze", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_analyze_long_text_is_truncated_with_a_warning():
    proc = _run("analyze", "so happy " * 2000, "--json", "--no-vad")
    assert proc.returncode == 0, proc.stderr
    assert "truncated to 5000" in proc.stderr
    assert json.loads(proc.stdout)["utterances"][0]["emotions"]


def _tiny_goemotions(folder):
    folder.mkdir()
    happy = ["what a great day", "I love this so much", "this is wonderful news", "so glad you came"]
    angry = ["this is outrageous", "I hate waiting", "stop lying to me", "you ruined everything"]
    rows = [f"{t} {i}\t17\tid{i}{k}" for i in range(4) for k, t in enumerate(happy)]
    rows += [f"{t} {i}\t2\tjd{i}{k}" for i in range(4) for k, t in enumerate(angry)]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("so glad and happy\t17\td1\nI hate this so much\t2\td2\nlove it\t17,0\td3\n")


def test_train_then_evaluate_with_plots(tmp_path):
    from safetensors import safe_open

    data = tmp_path / "goemotions"
    _tiny_goemotions(data)
    out = tmp_path / "model"
    proc = _run("train", "text-emotion", "--data", str(data), "--out", str(out), "--json", "--tuned-layers", "1",
                "--epochs", "2", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert {"macro_f1", "ece", "temperature", "cross_fitted"} <= set(metrics)
    assert len(metrics["dev_score_per_epoch"]) == 2 and metrics["hyper"]["tuned_layers"] == 1
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "metrics.json", "README.md"}
    card = (out / "README.md").read_text()
    assert "## Dev scores" in card and "top 1 layers fine-tuned" in card
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tuned = [k for k in f.keys() if k.startswith("encoder.layers.0.")]
        assert json.loads(f.metadata()["config"])["tuned_layers"] == 1
    assert len(tuned) == 16  # query/key/value/attn_out/ffn_in/ffn_out weights and biases, two LayerNorms
    proc = _run("evaluate", str(out), "--data", str(data / "dev.tsv"), "--plots", str(tmp_path / "plots"), "--json",
                cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == "text-emotion" and result["rows"] == 3 and 0 <= result["macro_f1"] <= 1
    for png in ("confusion_matrix.png", "reliability_diagram.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_frozen_recipe_reuses_the_embedding_cache(tmp_path):
    data = tmp_path / "goemotions"
    _tiny_goemotions(data)
    args = ("train", "text-emotion", "--data", str(data), "--out", str(tmp_path / "model"), "--json",
            "--tuned-layers", "0")
    first = json.loads(_run(*args, cache=tmp_path / "cache").stdout)
    assert first["texts_encoded_this_run"] == 35 and first["hyper"]["tuned_layers"] == 0
    assert json.loads(_run(*args, cache=tmp_path / "cache").stdout)["texts_encoded_this_run"] == 0


def test_train_more_tuned_layers_than_the_encoder_has(tmp_path):
    data = tmp_path / "goemotions"
    _tiny_goemotions(data)
    proc = _run("train", "text-emotion", "--data", str(data), "--out", str(tmp_path / "o"), "--tuned-layers", "7")
    assert proc.returncode == 2 and "tuned_layers: expected 0..6 for 'all-MiniLM-L6-v2', got 7" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (("vad", "--epochs", "3"), "only for erc and text-emotion"),
    (("text-emotion", "--tuned-layers", "-1"), "--tuned-layers: expected at least 0, got -1"),
    (("erc", "--epochs", "0"), "--epochs: expected at least 1, got 0"),
])
def test_train_bad_recipe_options(tmp_path, args, message):
    proc = _run("train", *args, "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_regression_file(tmp_path):
    f = tmp_path / "vad.csv"
    f.write_text("id,split,V,A,D,text\n1,dev,4.2,3.1,3.0,I love sunny days\n2,dev,1.8,3.6,2.4,I am miserable\n"
                 "3,dev,3.0,3.0,3.0,The bus leaves at noon\n4,train,3,3,3,ignored row\n")
    proc = _run("evaluate", "vad", "--data", str(f), "--json", "--plots", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"] == 3 and -1 <= result["V_pearson_r"] <= 1
    assert (tmp_path / "p" / "predicted_vs_gold.png").is_file()
    proc = _run("evaluate", "vad", "--data", str(f), "--split", "test")
    assert proc.returncode == 2 and "split: expected one of ['dev', 'train']" in proc.stderr


def test_train_bad_data_folder(tmp_path):
    proc = _run("train", "vad", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no emobank_train_dev.csv" in proc.stderr
    assert not (tmp_path / "o").exists()
