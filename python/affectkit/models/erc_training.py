"""Training recipe of `erc-meld` (what `affectkit train erc` runs).

MELD train dialogues; the frozen bottom of the encoder runs once over every utterance, then
the tuned top layers (started from the shipped text-emotion model's, which were fine-tuned on
GoEmotions: intermediate-task transfer) and M2FNet train jointly with AdamW on a
class-weighted cross-entropy (MELD is 47 % neutral). The epoch with the best dev weighted F1
is kept and a softmax temperature is fitted on dev. The test split is never read.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.metrics import classification_report, f1_score

from ..data import meld
from ..metrics import accuracy, expected_calibration_error, group_bootstrap, weighted_f1, weighted_f1_at_class_mix
from ..text.cache import atomic_write_bytes
from ..text.encoder import DEFAULT_MODEL, clean_texts
from .erc import ERCModel, ERCNet, extra_features, pack
from .m2fnet import class_weights, focal_loss, speaker_ids

HYPER = dict(tuned_layers=4, d_model=256, num_heads=4, num_layers=2, dropout=0.3, encoder_dropout=0.1,
             lr=3e-4, encoder_lr=5e-5, weight_decay=1e-2, epochs=12, batch_dialogues=16,
             class_weight_power=0.5, focal_gamma=0.0, extra_features=("lexicon", "text-emotion"),
             encoder_init="text-emotion")


class _Split:
    """One MELD split, encoded once: frozen token states, extra feature rows, labels."""

    def __init__(self, df, net: ERCNet, extra: list[str], progress: bool):
        self.dialogues = meld.dialogues(df)
        texts = clean_texts([t for d in self.dialogues for t in d.texts])
        self.states = _frozen_states(net, texts, progress)
        self.extra = extra_features(texts, extra)
        self.labels = torch.tensor([meld.LABELS.index(e) for d in self.dialogues for e in d.emotions])
        self.speakers = [speaker_ids(d.speakers) for d in self.dialogues]
        self.offsets = np.cumsum([0] + [len(d) for d in self.dialogues])

    def dialogue_of_rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.dialogues)), np.diff(self.offsets))

    def batch(self, idx):
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        speakers, lengths = pack([self.speakers[i] for i in idx])
        return [self.states[r] for r in rows], self.extra[rows], speakers, lengths, self.labels[rows]


def estimate_at_test_mix(y_dev, pred, dialogue_of_rows) -> dict:
    """Dev weighted F1 read at the test split's published class mix (48 % neutral there, 42 %
    on dev; see `metrics.weighted_f1_at_class_mix`), with the 5-95 % range of a bootstrap over
    dev dialogues. An estimate of the test score, not a measurement of it."""
    def score(y, p):
        # A resample (or a small dev set) without some class cannot be reweighted to the mix.
        if len(np.unique(y)) < len(meld.LABELS):
            return float("nan")
        return weighted_f1_at_class_mix(y, p, meld.TEST_LABEL_COUNTS)

    estimate = score(y_dev, pred)
    if np.isnan(estimate):
        return {}
    spread = group_bootstrap(score, dialogue_of_rows, y_dev, pred)
    return {"dev_weighted_f1_at_test_class_mix": estimate,
            "dev_weighted_f1_at_test_class_mix_5_95": [float(np.nanpercentile(spread, 5)),
                                                       float(np.nanpercentile(spread, 95))]}


def _frozen_states(net, texts, progress):
    from rich.progress import Progress

    out = []
    step = 512
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("encoding utterances", total=len(texts))
        for i in range(0, len(texts), step):
            out += net.encoder.frozen_states(texts[i:i + step])
            bar.advance(task, min(step, len(texts) - i))
    return out


def _flat_logits(net, split: _Split, batch: int = 32) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(split.dialogues), batch):
            states, lex, speakers, lengths, _ = split.batch(range(start, min(start + batch, len(split.dialogues))))
            logits = net(states, lex, speakers, lengths)
            valid = torch.arange(speakers.shape[1])[None, :] < lengths[:, None]
            out.append(logits[valid].double().numpy())
    return np.concatenate(out)


def init_tuned_layers(net: ERCNet, model) -> None:
    """Start the encoder's tuned layers from those of a fine-tuned text model (a name such as
    "text-emotion" or a trained folder): intermediate-task transfer from its corpus to MELD."""
    from . import resolve
    from .base import read_weights

    tensors, config = read_weights(resolve(model))
    k = len(net.encoder.layers)
    if config.get("tuned_layers", 0) != k or config.get("encoder") != net.encoder.base:
        raise ValueError(f"encoder_init: expected a model with the top {k} layers of {net.encoder.base!r} tuned, got "
                         f"{config.get('tuned_layers', 0)} tuned layers of {config.get('encoder')!r} (match tuned_layers to "
                         "it, or set encoder_init=None)")
    prefix = "encoder.layers."
    net.encoder.layers.load_state_dict({n[len(prefix):]: v.float() for n, v in tensors.items() if n.startswith(prefix)})


def fit_softmax_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    def nll(log_t):
        return -log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(targets)), targets].mean()

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def train_erc(data, *, encoder_name: str = DEFAULT_MODEL, seed: int = 0, progress: bool = False,
              hyper: dict | None = None, log=None) -> tuple[ERCModel, dict]:
    hp = dict(HYPER, **(hyper or {}))
    torch.manual_seed(seed)
    train_df, dev_df = meld.load(data, "train"), meld.load(data, "dev")
    config = {"kind": "erc", "labels": list(meld.LABELS), "encoder": encoder_name,
              "extra_features": list(hp["extra_features"]),
              **{k: hp[k] for k in ("tuned_layers", "d_model", "num_heads", "num_layers", "dropout", "encoder_dropout")}}
    net = ERCNet(config)
    if hp["encoder_init"]:
        init_tuned_layers(net, hp["encoder_init"])
    start = time.perf_counter()
    train = _Split(train_df, net, config["extra_features"], progress)
    dev = _Split(dev_df, net, config["extra_features"], progress)
    encode_seconds = time.perf_counter() - start
    weights = class_weights(torch.bincount(train.labels, minlength=len(meld.LABELS)), hp["class_weight_power"])
    enc_params = list(net.encoder.parameters())
    opt = torch.optim.AdamW([
        {"params": enc_params, "lr": hp["encoder_lr"]},
        {"params": list(net.m2fnet.parameters()), "lr": hp["lr"]},
    ], weight_decay=hp["weight_decay"], foreach=True)
    steps = hp["epochs"] * int(np.ceil(len(train.dialogues) / hp["batch_dialogues"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[hp["encoder_lr"], hp["lr"]], total_steps=steps,
                                                pct_start=0.1, anneal_strategy="linear")
    rng = np.random.default_rng(seed)
    y_dev = dev.labels.numpy()
    best, best_f1, history = None, -1.0, []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("training erc", total=hp["epochs"])
        for epoch in range(hp["epochs"]):
            net.train()
            order = rng.permutation(len(train.dialogues))
            for i in range(0, len(order), hp["batch_dialogues"]):
                if log is not None and i and i % (hp["batch_dialogues"] * 20) == 0:
                    log(f"  epoch {epoch + 1}: {i}/{len(order)} dialogues ({time.perf_counter() - start:.0f} s)")
                states, lex, speakers, lengths, y = train.batch(order[i:i + hp["batch_dialogues"]])
                logits = net(states, lex, speakers, lengths)
                valid = torch.arange(speakers.shape[1])[None, :] < lengths[:, None]
                loss = focal_loss(logits[valid], y, weights, hp["focal_gamma"])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
            f1 = weighted_f1(y_dev, _flat_logits(net, dev).argmax(1))
            history.append(round(f1, 4))
            if log is not None:
                log(f"epoch {epoch + 1}: dev weighted F1 {f1:.4f} ({time.perf_counter() - start:.0f} s)")
            if f1 > best_f1:
                best, best_f1 = copy.deepcopy(net.state_dict()), f1
            bar.advance(task)
    net.load_state_dict(best)
    train_seconds = time.perf_counter() - start - encode_seconds
    logits = _flat_logits(net, dev)
    temperature = fit_softmax_temperature(logits, y_dev)
    model = ERCModel({"temperature": torch.tensor([temperature])}, config, net)
    probs = np.exp(log_softmax(logits / temperature, axis=1))
    pred = probs.argmax(1)
    one_hot = np.eye(len(meld.LABELS))[y_dev]
    report = classification_report(y_dev, pred, labels=range(len(meld.LABELS)), target_names=meld.LABELS,
                                   output_dict=True, zero_division=0)
    metrics = {
        "weighted_f1": weighted_f1(y_dev, pred),
        "macro_f1": float(f1_score(y_dev, pred, average="macro", zero_division=0)),
        "accuracy": accuracy(y_dev, pred),
        "ece_top_label": expected_calibration_error(probs.max(1), (pred == y_dev)),
        "ece_all_classes": expected_calibration_error(probs, one_hot),
        "temperature": temperature,
        "per_class_f1": {k: round(report[k]["f1-score"], 4) for k in meld.LABELS},
        "dev_weighted_f1_per_epoch": history,
        "best_epoch": int(np.argmax(history)) + 1,
        **estimate_at_test_mix(y_dev, pred, dev.dialogue_of_rows()),
        "train_utterances": len(train.labels), "train_dialogues": len(train.dialogues),
        "dev_utterances": len(dev.labels), "dev_dialogues": len(dev.dialogues),
        "encode_seconds": encode_seconds, "train_seconds": train_seconds,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "hyper": hp,
    }
    return model, metrics


def train(data, out_dir, *, encoder_name: str = DEFAULT_MODEL, seed: int = 0, progress: bool = False,
          hyper: dict | None = None, half: bool = False, log=None):
    """Train erc-meld; write out_dir/model.safetensors, metrics.json and README.md (the card)."""
    from .erc_card import write_erc_card

    model, metrics = train_erc(data, encoder_name=encoder_name, seed=seed, progress=progress, hyper=hyper, log=log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out, half=half)
    atomic_write_bytes(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    write_erc_card(out, model.config, metrics)
    return model, metrics
