"""`affectkit analyze | train | evaluate`: the text-model commands of the command line."""

from __future__ import annotations

import json
import sys
import warnings

from rich.table import Table

EXAMPLE = "the bundled example dialogue (affectkit/examples/dialogue.txt)"


def _fail(message: str) -> int:
    # Plain print: rich would wrap long messages (paths) across lines.
    print(f"error: {message}", file=sys.stderr)
    return 2


def _guarded(fn):
    """Clear message and exit code 2 for bad input; warnings (e.g. truncation) go to stderr."""

    def run(args, console):
        from .text.encoder import TruncationWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = fn(args, console)
            except (ValueError, TypeError, FileNotFoundError, UnicodeError) as err:
                code = _fail(str(err))
            except KeyboardInterrupt:
                code = _fail("interrupted")
        for w in caught:
            if issubclass(w.category, TruncationWarning):
                print(f"warning: {w.message}", file=sys.stderr)
        return code

    return run


def _example_path():
    from importlib import resources

    return resources.files("affectkit").joinpath("examples", "dialogue.txt")


def _cmd_analyze(args, console) -> int:
    from .analyze import analyze
    from .textio import Document, Utterance, parse_lines, read_document

    if args.text is not None and args.file is not None:
        return _fail("give either a text or --file, not both")
    if args.example:
        doc = parse_lines(_example_path().read_text(encoding="utf-8"), EXAMPLE)
    elif args.file is not None:
        doc = read_document(args.file, column=args.column)
    elif args.text is not None:
        if not args.text.strip():
            return _fail("the text is empty; give some words to analyze")
        doc = Document([Utterance(args.text)], "lines")
    else:
        return _fail("give a text, --file FILE, or --example")
    from .retrieval import TrainingDataMissing

    source = EXAMPLE if args.example else (args.file or "the text")
    try:
        result = analyze(doc, emotion=args.model, vad=None if args.no_vad else args.vad_model,
                         erc=None if args.no_context else args.erc_model, top=args.top,
                         # --explain may build the corpus index on first use: show its progress
                         progress=not args.json and (len(doc.utterances) > 200 or args.explain),
                         explain=3 if args.explain else 0, data=args.data, source=str(source))
    except TrainingDataMissing as err:
        return _fail(f"--explain needs the {err.corpus.title} training data: pass --data DIR or set AFFECTKIT_DATA "
                     f"({err.detail})")
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    table = Table(title=f"affectkit analyze ({result['kind']}, {len(result['utterances'])} utterances)")
    if doc.is_dialogue:
        table.add_column("speaker")
    context = any("in_context" in row for row in result["utterances"])
    for col in ("text", "top emotions") + (("in context",) if context else ()) + ("V", "A", "D"):
        table.add_column(col, overflow="fold")
    for row in result["utterances"]:
        top = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in row["top"])
        vad = row.get("vad")
        cells = [row["text"], top]
        if context:
            c = row["in_context"]
            cells.append(f"{c['emotion']} {c['probability']:.2f}")
        cells += [f"{vad[k]:.2f}" for k in ("valence", "arousal", "dominance")] if vad else ["-"] * 3
        table.add_row(*(([row["speaker"] or ""] if doc.is_dialogue else []) + cells))
    console.print(table)
    if "speakers" in result:
        summary = Table(title="per speaker")
        for col in ("speaker", "utterances", "main emotion", "mean V/A/D"):
            summary.add_column(col)
        for s in result["speakers"]:
            v = s.get("mean_vad")
            vad = f"{v['valence']:.2f} / {v['arousal']:.2f} / {v['dominance']:.2f}" if v else "-"
            summary.add_row(s["speaker"], str(s["utterances"]), f"{s['main_emotion']} {s['mean_probability']:.2f}", vad)
        console.print(summary)
    for note in result.get("notes", []):
        console.print(f"note: {note}", style="yellow")
    if args.explain:
        from .retrieval.explain_table import explain_table

        console.print(explain_table(result, dialogue=doc.is_dialogue))
    return 0


def _cmd_train(args, console) -> int:
    import os

    hyper = {}
    if args.epochs is not None:
        hyper["epochs"] = args.epochs
    if args.tuned_layers is not None:
        hyper["tuned_layers"] = args.tuned_layers
    if hyper and args.kind not in ("erc", "text-emotion"):
        return _fail(f"--epochs/--tuned-layers: only for erc and text-emotion, got kind {args.kind!r}")
    for name, low in (("epochs", 1), ("tuned_layers", 0)):  # the encoder checks its own layer count
        if name in hyper and hyper[name] < low:
            return _fail(f"--{name.replace('_', '-')}: expected at least {low}, got {hyper[name]}")
    log = None if args.json else console.print
    if args.kind == "erc":
        from .models.erc_training import HYPER
        from .models.erc_training import train as train_erc

        if hyper.get("tuned_layers", HYPER["tuned_layers"]) != HYPER["tuned_layers"]:
            hyper["encoder_init"] = None  # text-emotion's tuned layers cannot seed another count
        _, metrics = train_erc(args.data, args.out, encoder_name=args.encoder, seed=args.seed, progress=not args.json,
                               hyper=hyper or None, log=log)
    else:
        from .models.training import train

        _, metrics = train(args.kind, args.data, args.out, encoder_name=args.encoder, seed=args.seed,
                           progress=not args.json, hyper=hyper or None, log=log)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 reports
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(console, f"trained {args.kind} -> {args.out} (dev scores)", metrics)
    return 0


def _cmd_evaluate(args, console) -> int:
    from .models import load
    from .models.evaluation import evaluate

    model = load(args.model)
    metrics = evaluate(model, args.data, split=args.split, plots_dir=args.plots, progress=not args.json)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(console, f"evaluate {args.model} on {args.data}", metrics)
    return 0


def _print_metrics(console, title, metrics) -> None:
    table = Table(title=title, show_header=False)
    for key, value in metrics.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(key, str(value))
    console.print(table)


def add_text_commands(sub) -> None:
    from .models import NAMES, TRAIN_KINDS

    p = sub.add_parser("analyze", help="emotions and valence/arousal/dominance of text",
                       description="Per utterance: top emotions with calibrated probabilities and V/A/D. "
                                   "A file may be plain text (one utterance a line; `speaker: utterance` lines "
                                   "make a dialogue), CSV (a text column) or JSON lines.")
    p.add_argument("text", nargs="?", help="the text to analyze")
    p.add_argument("--file", "-f", help="read utterances from this file (.txt, .csv, .jsonl)")
    p.add_argument("--example", action="store_true", help=f"analyze {EXAMPLE}")
    p.add_argument("--column", default="text", help="text column of a CSV / field of JSON lines (default: text)")
    p.add_argument("--top", type=int, default=3, help="emotions shown per utterance (default 3)")
    p.add_argument("--model", default="text-emotion", help="emotion model: name or trained folder")
    p.add_argument("--vad-model", default="vad", help="valence/arousal/dominance model: name or folder")
    p.add_argument("--no-vad", action="store_true", help="skip valence/arousal/dominance")
    p.add_argument("--erc-model", default="erc-meld",
                   help="conversation model for the in-context emotion of dialogues: name or folder")
    p.add_argument("--no-context", action="store_true", help="skip the in-context (conversation model) emotion")
    p.add_argument("--explain", action="store_true",
                   help="also show the 3 nearest GoEmotions training examples of each utterance's top emotion "
                        "(needs the corpus: --data DIR or $AFFECTKIT_DATA; the index is cached after the first use)")
    p.add_argument("--data", default=None, help="corpus folder for --explain (default: $AFFECTKIT_DATA)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(_cmd_analyze))

    p = sub.add_parser("train", help="train a text model on a corpus folder",
                       description="Train on the corpus under --data (the folder holding goemotions/, emobank/, "
                                   "empathic_reactions/, meld/, or the corpus folder itself) and write model.safetensors, "
                                   "metrics.json and a model card README.md to --out. text-emotion, vad and empathy run "
                                   "across processes when launched with torchrun (DistributedDataParallel on gloo; rank 0 "
                                   "writes). erc trains the conversation model (M2FNet on MELD, text only).")
    p.add_argument("kind", choices=TRAIN_KINDS)
    p.add_argument("--data", required=True, help="corpus folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence-transformers model name or path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None,
                   help="erc and text-emotion: training epochs (default: the recipe's)")
    p.add_argument("--tuned-layers", type=int, default=None,
                   help="erc and text-emotion: encoder layers fine-tuned (default: the recipe's, 4; erc starts them "
                        "from text-emotion's unless another count is asked); text-emotion with 0 trains a head on "
                        "the frozen, cached embedding in about a minute")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(_cmd_train))

    p = sub.add_parser("evaluate", help="score a model on a labelled file",
                       description="text-emotion: a GoEmotions TSV or a CSV with text,labels. vad: a CSV with "
                                   "text,V,A,D (rows of --split when it has a split column). empathy: a CSV with "
                                   "essay (or text),empathy,distress. erc-meld: a MELD CSV (Utterance, Speaker, Emotion, "
                                   "Dialogue_ID, Utterance_ID).")
    p.add_argument("model", help=f"one of {', '.join(NAMES)} or a trained folder")
    p.add_argument("--data", required=True, help="labelled file")
    p.add_argument("--split", default=None, help="rows of this split when the file has a split column (default dev)")
    p.add_argument("--plots", default=None, help="write PNG plots (confusion matrix, reliability diagram) here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(_cmd_evaluate))


