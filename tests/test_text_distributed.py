"""`affectkit train` across two CPU processes: torchrun, DistributedDataParallel, gloo."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import affectkit


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                                    reason="torchrun not installed beside this Python")


def _torchrun(tmp_path, *args):
    env = dict(os.environ, AFFECTKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "affectkit", "train", *args,
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone prints


@needs_torchrun
def test_two_process_training(tmp_path):
    data = tmp_path / "emobank"
    data.mkdir()
    rows = ["id,split,V,A,D,text"]
    words = ["wonderful", "awful", "calm", "furious", "happy", "sad", "bored", "thrilled"]
    for i in range(48):
        w = words[i % len(words)]
        v = 4.0 if w in ("wonderful", "happy", "thrilled", "calm") else 2.0
        rows.append(f"{i},{'dev' if i % 6 == 0 else 'train'},{v},{2 + i % 3},{3 + i % 2},It was a {w} day number {i}")
    (data / "emobank_train_dev.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "model"
    metrics = _torchrun(tmp_path, "vad", "--data", str(data), "--out", str(out))
    assert metrics["world_size"] == 2 and metrics["train_rows"] == 40
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    model = affectkit.load(str(out))
    assert model.predict(["a wonderful day"]).shape == (1, 3)


@needs_torchrun
def test_two_process_fine_tuning(tmp_path):
    data = tmp_path / "goemotions"
    data.mkdir()
    rows = [f"{t} {i}\t{label}\tid{i}{k}" for i in range(5)
            for k, (t, label) in enumerate([("what a great day", 17), ("I love this", 18), ("stop lying", 2)])]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "dev.tsv").write_text("so happy\t17\td1\nI hate this\t2\td2\nlove it\t18\td3\n")
    out = tmp_path / "model"
    metrics = _torchrun(tmp_path, "text-emotion", "--data", str(data), "--out", str(out), "--tuned-layers", "1",
                        "--epochs", "2")
    # finetune() checks that the two replicas ended with equal weights before reporting world_size.
    assert metrics["world_size"] == 2 and metrics["train_rows"] == 15 and len(metrics["dev_score_per_epoch"]) == 2
    model = affectkit.load(str(out))
    assert model.config["tuned_layers"] == 1 and model.predict_proba(["a great day"]).shape == (1, 28)
