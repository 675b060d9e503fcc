"""Train and evaluate EEG emotion models (HiSTN, DGCNN) under subject-aware protocols.

``run(dataset, "histn", "valence", "loso")`` cuts the dataset into windows, splits them
without letting windows of one trial reach both sides (``affectkit.evaluation.splits``),
trains a fresh model per split and returns per-subject weighted F1, accuracy and, for
DREAMER's five ordinal classes, HiSTN's Sequential Top-2 Hit Rate, as a JSON-able dict.

Targets: DREAMER scores 1..5 -> classes 0..4 (ordinal, Gaussian label smoothing as HiSTN);
DEAP ratings 1..9 -> high (> 5) / low; SEED labels -1/0/1 -> 0/1/2 (``target`` is ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .data import eeg_preprocessing as prep
from .data.eeg import EEGDataset
from .evaluation import splits as splitting

MODELS = ("histn", "dgcnn")
TARGETS = ("valence", "arousal", "dominance")
PROTOCOLS = ("kfold", "loso", "finetune")
DATASETS = ("dreamer", "deap", "seed")


def read_dataset(name: str, path) -> EEGDataset:
    """Read a corpus with its reader; DREAMER is checked for its 14 channels."""
    from .data import deap, dreamer, seed

    readers = {"dreamer": dreamer.read, "deap": deap.read, "seed": seed.read}
    if name not in readers:
        raise ValueError(f"dataset: expected one of {list(readers)}, got {name!r}")
    ds = readers[name](path)
    if name == "dreamer":
        ds = ds.select_channels(dreamer.CHANNELS)  # names the file and the missing channels
    return ds


@dataclass
class Task:
    y: np.ndarray  # (n,) int64 class per window
    num_classes: int
    ordinal: bool  # 5-class ordinal scores: Gaussian smoothing and seq2hr


def make_task(windows: prep.EEGWindows, dataset: str, target: str) -> Task:
    if dataset == "seed":
        labels = windows.targets["label"]
        return Task((labels + 1).astype(np.int64), 3, False)
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {list(TARGETS)}, got {target!r}")
    if target not in windows.targets:
        raise ValueError(f"target: this {dataset} data has no {target!r} ratings (has {sorted(windows.targets)})")
    scores = windows.targets[target]
    if dataset == "deap":
        return Task((scores > 5).astype(np.int64), 2, False)
    y = np.rint(scores).astype(np.int64) - 1
    if y.min() < 0 or y.max() > 4:
        raise ValueError(f"{target}: expected DREAMER scores 1..5, got {scores.min()}..{scores.max()}")
    return Task(y, 5, True)


def make_windows(ds: EEGDataset, dataset: str, model: str) -> prep.EEGWindows:
    if model == "dgcnn":
        return prep.differential_entropy(ds)
    if model == "histn":
        if dataset == "dreamer":
            shortest = min(t.signal.shape[1] for t in ds.trials) / ds.sfreq
            if shortest < 1.0:
                raise ValueError(f"{ds.source}: a trial of {shortest:.2f} s is shorter than the 1 s window")
            return prep.histn_windows(ds, keep_seconds=min(60.0, float(np.floor(shortest))))
        return prep.zscore_windows(ds)
    raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")


def make_model(model: str, windows: prep.EEGWindows, dataset: str, num_classes: int) -> torch.nn.Module:
    from .eeg.presets import lobe_hemisphere_groups
    from .models import DGCNN, HiSTN

    if model == "histn":
        regions = None if dataset == "dreamer" else lobe_hemisphere_groups(windows.channels)
        return HiSTN(channels=windows.channels, regions=regions, samples=windows.x.shape[2],
                     num_classes=num_classes)
    return DGCNN(windows.channels, bands=windows.x.shape[2], num_classes=num_classes)


def _loss(logits: torch.Tensor, y: torch.Tensor, ordinal: bool) -> torch.Tensor:
    from .models import gaussian_ordinal_loss

    return gaussian_ordinal_loss(logits, y) if ordinal else F.cross_entropy(logits, y)


def _fit(model, x, y, ordinal, epochs, lr, batch_size, gen, progress, label):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    constrain = getattr(model, "constrain_", None)
    task = progress.add_task(label, total=epochs, loss=float("nan")) if progress else None
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) < 2:
                continue  # batch norm needs two samples
            opt.zero_grad()
            loss = _loss(model(x[idx]), y[idx], ordinal)
            loss.backward()
            opt.step()
            if constrain is not None:
                constrain()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        if progress:
            progress.update(task, advance=1, loss=total / max(count, 1))
    if progress:
        progress.remove_task(task)


@torch.no_grad()
def _predict(model, x, batch_size=1024) -> np.ndarray:
    model.eval()
    return torch.cat([torch.softmax(model(b), 1) for b in x.split(batch_size)]).numpy()


def _progress(enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def run(ds: EEGDataset, model: str, target: str = "valence", protocol: str = "loso", *, dataset: Optional[str] = None,
        epochs: int = 30, finetune_epochs: Optional[int] = None, lr: float = 1e-3, batch_size: int = 256,
        folds: int = 5, seed: int = 0, shuffle_labels: bool = False, progress: bool = True) -> dict:
    """Train and test one fresh model per split; per-subject metrics and their means.

    Args:
        ds: an EEGDataset from the DREAMER, DEAP or SEED reader.
        model: "histn" or "dgcnn"; target: "valence", "arousal" or "dominance" (not SEED).
        protocol: "kfold" (within subject, by trial), "loso" (leave one subject out) or
            "finetune" (HiSTN's: others train, first 10 s of each held-out trial fine-tune).
        dataset: corpus kind; default ``ds.name``.
        shuffle_labels: permute the labels across trials first (a chance-level control).
    """
    dataset = dataset or ds.name
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {dataset!r}")
    if model not in MODELS:
        raise ValueError(f"model: expected one of {list(MODELS)}, got {model!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if epochs < 1:
        raise ValueError(f"epochs: expected at least 1, got {epochs}")
    windows = make_windows(ds, dataset, model)
    task = make_task(windows, dataset, target)
    y_all = task.y
    if shuffle_labels:  # one label per trial, permuted across trials
        keys = np.array([f"{s}/{t}" for s, t in zip(windows.subject, windows.trial)])
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        y_all = np.random.default_rng(seed).permutation(y_all[first])[inverse]
    if protocol == "kfold":
        splits = splitting.kfold_by_trial(windows, k=folds, seed=seed)
    elif protocol == "loso":
        splits = splitting.leave_one_subject_out(windows)
    else:
        splits = splitting.finetune_protocol(windows)
    x = torch.from_numpy(np.ascontiguousarray(windows.x, dtype=np.float32))
    y = torch.from_numpy(y_all)
    probs = np.full((len(windows), task.num_classes), np.nan)
    tested = np.zeros(len(windows), dtype=bool)
    parameters = None
    with _progress(progress) as bar:
        overall = bar.add_task("splits", total=len(splits), loss=float("nan")) if bar else None
        for i, split in enumerate(splits):
            torch.manual_seed(seed + i)
            gen = torch.Generator().manual_seed(seed + i)
            net = make_model(model, windows, dataset, task.num_classes)
            parameters = sum(p.numel() for p in net.parameters() if p.requires_grad)
            train = torch.from_numpy(split.train)
            _fit(net, x[train], y[train], task.ordinal, epochs, lr, batch_size, gen, bar, split.name)
            if split.finetune is not None:
                tune = torch.from_numpy(split.finetune)
                _fit(net, x[tune], y[tune], task.ordinal, finetune_epochs or max(1, epochs // 3), lr,
                     batch_size, gen, bar, f"{split.name} fine-tune")
            probs[split.test] = _predict(net, x[torch.from_numpy(split.test)])
            tested[split.test] = True
            if bar:
                bar.update(overall, advance=1)
    idx = np.flatnonzero(tested)
    pred, truth, subj = probs[idx].argmax(1), y_all[idx], windows.subject[idx]
    scores = {"weighted_f1": metrics.weighted_f1, "accuracy": metrics.accuracy}
    per_subject: dict[str, dict[str, float]] = {}
    means = {}
    for name, fn in scores.items():
        means[name], by = metrics.per_subject(fn, subj, truth, pred)
        for s, v in by.items():
            per_subject.setdefault(s, {})[name] = v
    if task.ordinal:
        means["seq2hr"], by = metrics.per_subject(lambda p, t: metrics.seq2hr(p, t), subj, probs[idx], truth)
        for s, v in by.items():
            per_subject[s]["seq2hr"] = v
    for s in per_subject:
        per_subject[s]["windows"] = int((subj == s).sum())
    return {
        "dataset": dataset, "model": model, "target": None if dataset == "seed" else target,
        "protocol": protocol, "classes": task.num_classes, "chance": float(np.bincount(truth).max() / len(truth)),
        "epochs": epochs, "parameters": parameters, "splits": len(splits), "windows": int(len(windows)),
        "shuffled_labels": shuffle_labels, "mean": means, "per_subject": per_subject,
    }
