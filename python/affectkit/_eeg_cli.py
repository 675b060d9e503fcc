"""`affectkit train eeg`: train and evaluate an EEG emotion model under a subject-aware protocol."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table


def build_parser() -> argparse.ArgumentParser:
    from .eeg_training import DATASETS, MODELS, PROTOCOLS, TARGETS

    p = argparse.ArgumentParser(
        prog="affectkit train eeg",
        description="Train HiSTN or DGCNN on DREAMER (DREAMER.mat), DEAP (folder of sXX.dat) or SEED (folder of "
                    "<subject>_<date>.mat with label.mat) and report per-subject weighted F1, accuracy and (DREAMER "
                    "5-class) Sequential Top-2 Hit Rate. One fresh model per split.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data", required=True, help="the corpus file or folder")
    p.add_argument("--model", default="histn", choices=MODELS)
    p.add_argument("--target", default="valence", choices=TARGETS, help="rating to classify (ignored for SEED)")
    p.add_argument("--protocol", default="loso", choices=PROTOCOLS,
                   help="kfold: within subject by trial; loso: leave one subject out; finetune: HiSTN's "
                        "subject-independent protocol (fine-tune on the first 10 s of each held-out trial)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--folds", type=int, default=5, help="folds of --protocol kfold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    return p


def main(argv: list[str], console) -> int:
    from .eeg_training import read_dataset, run

    args = build_parser().parse_args(argv)
    try:
        ds = read_dataset(args.dataset, args.data)
        res = run(ds, args.model, args.target, args.protocol, dataset=args.dataset, epochs=args.epochs, lr=args.lr,
                  batch_size=args.batch_size, folds=args.folds, seed=args.seed, progress=sys.stderr.isatty())
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)  # plain print: rich would wrap long paths
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    names = list(res["mean"])
    table = Table(title=f"{res['model']} on {res['dataset']} ({res['target'] or 'label'}, {res['protocol']}, "
                        f"{res['classes']} classes, chance {res['chance']:.1%})")
    for col in ("subject", *names, "windows"):
        table.add_column(col)
    for s, row in res["per_subject"].items():
        table.add_row(s, *(f"{row[n]:.1%}" for n in names), str(row["windows"]))
    tested = sum(row["windows"] for row in res["per_subject"].values())
    table.add_row("mean", *(f"{res['mean'][n]:.1%}" for n in names), str(tested), style="bold")
    console.print(table)
    return 0
