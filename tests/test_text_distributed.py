"""`affectkit train` across two CPU processes: torchrun, DistributedDataParallel, gloo."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import affectkit


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed beside this Python")
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
    env = dict(os.environ, AFFECTKIT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "affectkit", "train", "vad",
                           "--data", str(data), "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone prints
    assert metrics["world_size"] == 2 and metrics["train_rows"] == 40
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    model = affectkit.load(str(out))
    assert model.predict(["a wonderful day"]).shape == (1, 3)
