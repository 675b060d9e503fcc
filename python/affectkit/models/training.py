"""Training recipes for `text-emotion`, `vad` and `empathy` (what `affectkit train` runs).

vad: frozen sentence embedding (cached) + NRC EmoLex features, standardised, into a small MLP
head trained with AdamW; the epoch with the best dev loss is kept. empathy: empathy_training.py.
text-emotion: the encoder's top layers fine-tuned together with such a head (finetune.py; the
epoch with the best cross-fitted dev macro-F1 is kept), or with tuned_layers=0 the frozen recipe
above plus hashed n-grams; then a temperature and per-label thresholds are fitted on dev.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..text.encoder import DEFAULT_MODEL, TextEncoder, clean_texts
from ..text.ngrams import hashed_ngrams
from ..text.features import FeatureExtractor
from .base import Head, run_head, sparse_tensor
from .calibration import choose_thresholds, decide, fit_temperature
from ..metrics import expected_calibration_error, multilabel_metrics, regression_metrics

HYPER = {
    # The shipped recipe: the encoder's top 4 layers fine-tuned with the head (see finetune.py).
    "text-emotion": dict(tuned_layers=4, hidden=512, dropout=0.3, lr=1e-3, encoder_lr=5e-5, weight_decay=1e-2,
                         epochs=3, batch=32, ngram_features=0, sparse_lr=4e-3),
    # tuned_layers=0: the frozen embedding (cached) and the head alone, in seconds.
    "text-emotion-frozen": dict(tuned_layers=0, hidden=512, dropout=0.3, lr=1e-3, weight_decay=1e-2, epochs=25,
                                batch=256, patience=3, ngram_features=2**17, sparse_lr=4e-3, sparse_weight_decay=0.0),
    "vad": dict(hidden=512, dropout=0.5, lr=1e-3, weight_decay=5e-2, epochs=80, batch=128, patience=8),
}


def fit_head(x_tr, y_tr, x_dev, y_dev, *, loss: str, hidden: int, dropout: float, lr: float,
             weight_decay: float, epochs: int, batch: int, patience: int, seed: int = 0,
             s_tr=None, s_dev=None, ngram_features: int = 0, sparse_lr: float = 1e-3,
             sparse_weight_decay: float = 0.0, progress: bool = False) -> tuple[Head, dict]:
    """Train a Head; keep the state with the lowest dev loss (early stopping on dev).
    s_tr/s_dev: optional hashed n-gram CSR matrices (ngram_features columns)."""
    torch.manual_seed(seed)
    head = Head(x_tr.shape[1], y_tr.shape[1], hidden, dropout, sparse_dim=ngram_features if s_tr is not None else 0)
    head.set_standardisation(x_tr)
    crit = nn.BCEWithLogitsLoss() if loss == "bce" else nn.MSELoss()
    groups = [{"params": list(head.net.parameters()), "weight_decay": weight_decay}]
    if head.sparse_dim:
        groups.append({"params": [head.sparse_weight], "weight_decay": sparse_weight_decay, "lr": sparse_lr})
    opt = torch.optim.AdamW(groups, lr=lr)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.float32))
    xd, yd = torch.from_numpy(x_dev), torch.from_numpy(y_dev.astype(np.float32))
    sd = sparse_tensor(s_dev) if head.sparse_dim else None
    gen = torch.Generator().manual_seed(seed)
    best, best_loss, best_epoch, history = None, float("inf"), -1, []
    from rich.progress import Progress

    rank, world = _dist_rank_world()
    # Under torch.distributed every rank holds all rows and draws the same permutation; each
    # takes its share of every batch and DDP averages the gradients.
    model = head
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(head)
    with Progress(disable=not progress or rank != 0, transient=True) as bar:
        task = bar.add_task("training", total=epochs)
        for epoch in range(epochs):
            head.train()
            for idx in torch.randperm(len(xt), generator=gen).split(batch):
                if len(idx) < world:
                    continue  # every rank must take part in each step
                idx = idx[rank::world]
                opt.zero_grad()
                st = sparse_tensor(s_tr[idx.numpy()]) if head.sparse_dim else None
                crit(model(xt[idx], st), yt[idx]).backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                dev_loss = float(crit(head(xd, sd), yd))
            history.append(dev_loss)
            if dev_loss < best_loss:
                best, best_loss, best_epoch = copy.deepcopy(head.state_dict()), dev_loss, epoch
            elif epoch - best_epoch >= patience:
                break
            bar.advance(task)
    if best is None:
        raise ValueError(f"training diverged: the dev loss was never finite ({history[:3]} ...); check the targets")
    head.load_state_dict(best)
    info = {"best_epoch": best_epoch + 1, "dev_loss": best_loss, "epochs_run": len(history)}
    if world > 1:
        _check_ranks_agree(head)
        info["world_size"] = world
    return head.eval(), info


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_ranks_agree(head: nn.Module) -> None:
    """DDP keeps replicas identical; fail loudly if they drifted (e.g. ranks saw different data)."""
    import torch.distributed as dist

    total = float(sum(p.double().sum() for p in head.state_dict().values()))
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, total)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(total)):
        raise RuntimeError(f"distributed training: replicas disagree after training (parameter sums {sums})")


def holdout_mask(ids, fraction: float = 0.2) -> np.ndarray:
    """A fixed, order-independent held-out subset: ids whose SHA-256 falls in the first `fraction`."""
    h = [int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) / 2**32 for i in ids]
    return np.asarray(h) < fraction


def _features(encoder, texts, progress):
    return FeatureExtractor(encoder)(list(texts), progress=progress)


def train_text_emotion(data, *, encoder: TextEncoder | None = None, seed: int = 0, progress: bool = False,
                       hyper: dict | None = None, log=None):
    """GoEmotions train -> model; dev -> epoch choice, temperature, thresholds, metrics.
    hyper["tuned_layers"] = 0 selects the frozen-embedding recipe."""
    from ..data import goemotions
    from .emotion import TextEmotionModel

    encoder = encoder or TextEncoder(DEFAULT_MODEL)
    hyper = dict(hyper or {})
    tuned = hyper.get("tuned_layers", HYPER["text-emotion"]["tuned_layers"])
    hp = dict(HYPER["text-emotion" if tuned else "text-emotion-frozen"], **hyper)
    train, dev = goemotions.load(data, "train"), goemotions.load(data, "dev")
    t_tr, t_dev = clean_texts(list(train["text"])), clean_texts(list(dev["text"]))
    y_tr, y_dev = goemotions.multi_hot(train["labels"]), goemotions.multi_hot(dev["labels"])
    s_tr = s_dev = None
    if hp["ngram_features"]:
        s_tr, s_dev = hashed_ngrams(t_tr, hp["ngram_features"]), hashed_ngrams(t_dev, hp["ngram_features"])
    config = {"kind": "text-emotion", "labels": list(goemotions.LABELS), "encoder": encoder.name,
              "out_dim": y_tr.shape[1], "hidden": hp["hidden"], "ngram_features": hp["ngram_features"],
              "tuned_layers": tuned}
    start = time.perf_counter()
    if tuned:
        tensors, logits, fit = _fit_tuned_text_emotion(encoder.name, (t_tr, y_tr, s_tr), (t_dev, y_dev, s_dev), hp,
                                                       seed, progress, log)
        config["in_dim"] = int(tensors["head.mean"].shape[0])
    else:
        x_tr, x_dev = _features(encoder, t_tr, progress), _features(encoder, t_dev, progress)
        start = time.perf_counter()
        head, fit = fit_head(x_tr, y_tr, x_dev, y_dev, loss="bce", seed=seed, progress=progress, s_tr=s_tr,
                             s_dev=s_dev, **{k: v for k, v in hp.items() if k != "tuned_layers"})
        logits = run_head(head, x_dev, s_dev)
        tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
        config["in_dim"] = x_tr.shape[1]
    temperature = fit_temperature(logits, y_dev)
    probs = 1 / (1 + np.exp(-logits / temperature))
    thresholds = choose_thresholds(probs, y_dev)
    seconds = time.perf_counter() - start
    tensors["temperature"] = torch.tensor([temperature], dtype=torch.float32)
    tensors["thresholds"] = torch.from_numpy(thresholds)
    model = TextEmotionModel(tensors, config, FeatureExtractor(encoder))
    metrics = multilabel_metrics(y_dev, decide(probs, thresholds), probs, goemotions.ekman_matrix(), goemotions.LABELS)
    metrics.update(
        ece_before_temperature=expected_calibration_error(1 / (1 + np.exp(-logits)), y_dev),
        temperature=temperature,
        cross_fitted=cross_fitted_f1(probs, y_dev, seed),
        train_rows=len(train), dev_rows=len(dev), head_training_seconds=seconds, hyper=hp, **fit,
    )
    return model, metrics


def _fit_tuned_text_emotion(encoder_name: str, train: tuple, dev: tuple, hp: dict, seed: int, progress: bool, log):
    """Fine-tune the top hp["tuned_layers"] encoder layers with the head; the epoch with the best
    cross-fitted dev macro-F1 is kept. Returns (tensors, dev logits, info)."""
    from scipy.special import expit

    from ..text.lexicon import lexicon_features
    from ..text.utterance_encoder import UtteranceEncoder
    from .finetune import TunedTextNet, finetune, frozen_states, run_net

    torch.manual_seed(seed)
    encoder = UtteranceEncoder(encoder_name, hp["tuned_layers"], dropout=0.1)
    (t_tr, y_tr, s_tr), (t_dev, y_dev, s_dev) = train, dev
    start = time.perf_counter()
    st_tr, st_dev = frozen_states(encoder, t_tr, progress), frozen_states(encoder, t_dev, progress)
    frozen_seconds = time.perf_counter() - start
    lx_tr, lx_dev = lexicon_features(t_tr), lexicon_features(t_dev)
    head = Head(encoder.dim + lx_tr.shape[1], y_tr.shape[1], hp["hidden"], hp["dropout"],
                sparse_dim=hp["ngram_features"] if s_tr is not None else 0)
    net = TunedTextNet(encoder, head)
    with torch.no_grad():  # standardise with the untuned embedding's statistics
        emb = torch.cat([net.embed(st_tr[i:i + 512]) for i in range(0, len(st_tr), 512)]).numpy()
    head.set_standardisation(np.hstack([emb, lx_tr]))
    info = finetune(net, (st_tr, lx_tr, y_tr, s_tr), (st_dev, lx_dev, y_dev, s_dev), loss="bce",
                    score=lambda logits: cross_fitted_f1(expit(logits), y_dev, seed)["macro_f1"],
                    lr=hp["lr"], encoder_lr=hp["encoder_lr"], weight_decay=hp["weight_decay"], epochs=hp["epochs"],
                    batch=hp["batch"], sparse_lr=hp["sparse_lr"], seed=seed, progress=progress, log=log)
    logits = run_net(net, st_dev, lx_dev, s_dev)
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors.update({f"encoder.layers.{k}": v for k, v in encoder.layers.state_dict().items()})
    return tensors, logits, {"frozen_layers_seconds": frozen_seconds, **info}


def cross_fitted_f1(probs, y, seed: int = 0, folds: int = 2) -> dict:
    """Dev macro-F1 with thresholds chosen on the other half of dev: an estimate free of the
    optimism of choosing thresholds on the rows they are scored on."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import KFold

    scores = []
    for fit_idx, score_idx in KFold(folds, shuffle=True, random_state=seed).split(probs):
        th = choose_thresholds(probs[fit_idx], y[fit_idx])
        scores.append(f1_score(y[score_idx], decide(probs[score_idx], th), average="macro", zero_division=0))
    return {"macro_f1": float(np.mean(scores)), "folds": folds}


def train_regression(kind: str, data, *, encoder: TextEncoder | None = None, seed: int = 0, progress: bool = False):
    """`vad`: EmoBank train -> model, dev for early stopping and scores. `empathy`: the ridge
    recipe of empathy_training.py."""
    from .regression import RegressionModel

    if kind == "empathy":
        from .empathy_training import train_empathy

        return train_empathy(data, encoder=encoder, seed=seed, progress=progress)
    encoder = encoder or TextEncoder(DEFAULT_MODEL)
    if kind == "vad":
        from ..data import emobank

        train, dev = emobank.load(data, "train"), emobank.load(data, "dev")
        targets, scale = list(emobank.DIMENSIONS), (1.0, 5.0)
    else:
        raise ValueError(f"kind: expected 'vad' or 'empathy', got {kind!r}")
    x_tr, x_dev = _features(encoder, train["text"], progress), _features(encoder, dev["text"], progress)
    y_tr, y_dev = train[targets].to_numpy(np.float64), dev[targets].to_numpy(np.float64)
    mu, sd = y_tr.mean(0), np.maximum(y_tr.std(0), 1e-6)  # a constant target must not divide by zero
    start = time.perf_counter()
    head, fit = fit_head(x_tr, (y_tr - mu) / sd, x_dev, (y_dev - mu) / sd, loss="mse", seed=seed,
                         progress=progress, **HYPER[kind])
    seconds = time.perf_counter() - start
    config = {"kind": kind, "targets": targets, "scale": list(scale), "encoder": encoder.name,
              "in_dim": x_tr.shape[1], "out_dim": len(targets), "hidden": HYPER[kind]["hidden"]}
    tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
    tensors["target_mean"] = torch.from_numpy(mu.astype(np.float32))
    tensors["target_std"] = torch.from_numpy(sd.astype(np.float32))
    model = RegressionModel(tensors, config, FeatureExtractor(encoder))
    metrics = regression_metrics(y_dev, model.predict_features(x_dev), targets)
    metrics.update(train_rows=len(train), dev_rows=len(dev), head_training_seconds=seconds, **fit)
    return model, metrics


def _init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1), on gloo (CPU)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def train(kind: str, data, out_dir, *, encoder_name: str = DEFAULT_MODEL, seed: int = 0, progress: bool = False,
          hyper: dict | None = None, log=None):
    """Train `kind`, write out_dir/model.safetensors, metrics.json and README.md (the card).
    hyper overrides the text-emotion recipe (HYPER["text-emotion"]; tuned_layers=0: the frozen one)."""
    if hyper and kind != "text-emotion":
        raise ValueError(f"hyper: only the text-emotion recipe takes overrides, got {sorted(hyper)} for {kind!r}")
    from .card import write_card

    encoder = TextEncoder(encoder_name)
    start = time.perf_counter()
    started_here = _init_distributed_from_env()
    finished = False
    try:
        rank, _ = _dist_rank_world()
        if kind == "text-emotion":
            model, metrics = train_text_emotion(data, encoder=encoder, seed=seed, progress=progress and rank == 0,
                                                hyper=hyper, log=log if rank == 0 else None)
        else:
            model, metrics = train_regression(kind, data, encoder=encoder, seed=seed, progress=progress and rank == 0)
        finished = True
    finally:
        if started_here:
            import torch.distributed as dist

            if finished:  # no rank tears the group down while another still talks on it
                dist.barrier()
            dist.destroy_process_group()
    metrics["total_seconds_including_encoding"] = time.perf_counter() - start
    metrics["texts_encoded_this_run"] = encoder.calls
    if rank != 0:
        return model, metrics  # rank 0 writes the outputs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out)
    from ..text.cache import atomic_write_bytes

    atomic_write_bytes(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    write_card(out, model.config, metrics)
    return model, metrics
