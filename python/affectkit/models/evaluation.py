"""`affectkit evaluate`: score a model on a labelled file; optional PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import goemotions
from ..metrics import multilabel_metrics, regression_metrics
from .calibration import decide


def _read_emotion_file(path: Path) -> tuple[list[str], np.ndarray]:
    """GoEmotions TSV (no header), or a CSV with `text` and `labels` (comma-separated ids or names)."""
    if path.suffix.lower() == ".csv":
        from ..data._io import read_table

        df = read_table(path, ["text", "labels"], dtype=str, keep_default_na=False)
        ids = []
        for row_no, cell in enumerate(df["labels"], start=2):
            try:
                ids.append(tuple(int(x) if x.strip().isdigit() else goemotions.LABELS.index(x.strip())
                                 for x in cell.split(",")))
            except ValueError as err:
                raise ValueError(f"{path} line {row_no}: labels must be GoEmotions ids or names, got {cell!r}") from err
        texts = list(df["text"])
    else:
        df = goemotions.load(path)
        texts, ids = list(df["text"]), list(df["labels"])
    return texts, goemotions.multi_hot(ids)


def _read_regression_file(path: Path, targets, split: str | None) -> tuple[list[str], np.ndarray]:
    from ..data._io import read_table

    df = read_table(path, list(targets), keep_default_na=False)
    text_col = next((c for c in ("text", "essay") if c in df.columns), None)
    if text_col is None:
        raise ValueError(f"{path}: expected a 'text' (or 'essay') column; found {list(df.columns)}")
    if "split" in df.columns:
        split = split or "dev"
        if split not in set(df["split"]):
            raise ValueError(f"split: expected one of {sorted(set(df['split']))} in {path}, got {split!r}")
        df = df[df["split"] == split]
    return list(df[text_col]), df[list(targets)].to_numpy(np.float64)


def evaluate(model, data_file, *, split: str | None = None, plots_dir=None, progress: bool = False) -> dict:
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if model.kind == "erc":
        metrics = _evaluate_erc(model, path, plots_dir)
    elif model.kind == "text-emotion":
        texts, y = _read_emotion_file(path)
        probs = model.predict_proba(texts, progress=progress)
        metrics = multilabel_metrics(y, decide(probs, model.thresholds), probs, goemotions.ekman_matrix(), model.labels)
        if plots_dir is not None:
            metrics["plots"] = _emotion_plots(Path(plots_dir), y, probs, model.labels)
    else:
        texts, y = _read_regression_file(path, model.targets, split)
        pred = model.predict(texts, progress=progress)
        metrics = regression_metrics(y, pred, model.targets)
        if plots_dir is not None:
            metrics["plots"] = _scatter_plots(Path(plots_dir), y, pred, model.targets)
    metrics = {"model": model.kind, "data": str(path), **metrics}
    return metrics


def _evaluate_erc(model, path: Path, plots_dir) -> dict:
    """MELD-format CSV: weighted F1 over the 7 emotions (MELD's standard metric) and more."""
    from sklearn.metrics import classification_report, f1_score

    from ..data import meld
    from ..metrics import accuracy, expected_calibration_error, weighted_f1

    dialogues = meld.dialogues(meld.load(path))
    probs = np.concatenate(model.predict_dialogues_proba([list(zip(d.speakers, d.texts)) for d in dialogues]))
    y = np.array([model.labels.index(e) for d in dialogues for e in d.emotions])
    pred = probs.argmax(1)
    report = classification_report(y, pred, labels=range(len(model.labels)), target_names=model.labels,
                                   output_dict=True, zero_division=0)
    metrics = {
        "weighted_f1": weighted_f1(y, pred), "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "accuracy": accuracy(y, pred), "ece_top_label": expected_calibration_error(probs.max(1), pred == y),
        "per_class_f1": {k: round(report[k]["f1-score"], 4) for k in model.labels},
        "utterances": int(len(y)), "dialogues": len(dialogues),
    }
    if plots_dir is not None:
        metrics["plots"] = _erc_plots(Path(plots_dir), y, probs, model.labels)
    return metrics


def _erc_plots(out: Path, y, probs, labels) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    out.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay.from_predictions(y, pred, labels=range(len(labels)), display_labels=labels,
                                            normalize="true", values_format=".2f", ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix, row-normalised ({len(y)} utterances)")
    written = [_save_figure(fig, out / "confusion_matrix.png")]
    plt.close(fig)
    written.append(_reliability_diagram(out, pred == y, probs.max(1), "Reliability diagram (top label)",
                                        "probability of the predicted emotion", "observed accuracy", bins=10))
    return written


def _save_figure(fig, path: Path) -> str:
    from ..text.cache import atomic_write_bytes

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return str(path)


def _emotion_plots(out: Path, y, probs, labels) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    written = []
    single = y.sum(axis=1) == 1  # top-1 confusion only makes sense for single-label rows
    cm = confusion_matrix(np.argmax(y[single], 1), np.argmax(probs[single], 1), labels=range(len(labels)),
                          normalize="true")
    fig, ax = plt.subplots(figsize=(10, 9))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("top predicted label")
    ax.set_ylabel("gold label (single-label rows)")
    ax.set_title(f"Confusion matrix, row-normalised ({int(single.sum())} rows)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    written.append(_save_figure(fig, out / "confusion_matrix.png"))
    plt.close(fig)

    written.append(_reliability_diagram(out, y.ravel(), probs.ravel(), "Reliability diagram (all example-label pairs)",
                                        "predicted probability", "observed frequency", bins=15))
    return written


def _reliability_diagram(out: Path, observed, predicted, title: str, xlabel: str, ylabel: str, bins: int) -> str:
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    frac, conf = calibration_curve(observed, predicted, n_bins=bins, strategy="uniform")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    ax.plot(conf, frac, "o-", label="model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    path = _save_figure(fig, out / "reliability_diagram.png")
    plt.close(fig)
    return path


def _scatter_plots(out: Path, y, pred, targets) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 4))
    for ax, j, name in zip(np.atleast_1d(axes), range(len(targets)), targets):
        ax.scatter(y[:, j], pred[:, j], s=4, alpha=0.4)
        ax.set_xlabel(f"gold {name}")
        ax.set_ylabel(f"predicted {name}")
    path = _save_figure(fig, out / "predicted_vs_gold.png")
    plt.close(fig)
    return [path]
