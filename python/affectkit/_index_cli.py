"""`affectkit index build | search`: text indexes (retrieval by meaning, with a label filter)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.table import Table


def make_encoder(name: str):
    """The encoder for `name` (a function, so tests can substitute a fake)."""
    from .text.encoder import TextEncoder

    return TextEncoder(name)


def _labels_of(value, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"{where}: expected a label (string) or a list of labels, got {json.dumps(value)[:60]}")


def read_rows(path, column: str = "text", label_column: str | None = None) -> tuple[list[str], list | None]:
    """Texts (and label lists) from a CSV, JSON lines, or plain text file (one text a line)."""
    from .textio import read_text_file

    content = read_text_file(path)
    suffix = Path(path).suffix.lower()
    texts, labels = [], []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(content))
        fields = reader.fieldnames or []
        for name, flag in ((column, "--column"), (label_column, "--label-column")):
            if name is not None and name not in fields:
                raise ValueError(f"{path}: expected a column named {name!r} (choose another with {flag}); found {fields}")
        for line_no, row in enumerate(reader, start=2):
            text = row.get(column) or ""
            if not text.strip():
                raise ValueError(f"{path} line {line_no}, column {column!r}: the text is empty")
            texts.append(text)
            if label_column is not None:
                labels.append(_labels_of(row.get(label_column), f"{path} line {line_no}"))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for line_no, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict) or column not in obj:
                raise ValueError(f"{path} line {line_no}: expected an object with a {column!r} field (see --column)")
            if not isinstance(obj[column], str) or not obj[column].strip():
                raise ValueError(f"{path} line {line_no}, field {column!r}: expected non-empty text")
            texts.append(obj[column])
            if label_column is not None:
                if label_column not in obj:
                    raise ValueError(f"{path} line {line_no}: expected a {label_column!r} field (see --label-column)")
                labels.append(_labels_of(obj[label_column], f"{path} line {line_no}, field {label_column!r}"))
    else:
        if label_column is not None:
            raise ValueError(f"{path}: --label-column needs a .csv or .jsonl file; a plain text file has no columns")
        texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no rows in it; an index needs at least one text")
    return texts, (labels if label_column is not None else None)


def _check_out(out: str) -> Path:
    path = Path(out).expanduser()
    if path.is_dir():
        raise ValueError(f"--out: expected a file path, got the folder {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out: the folder {str(path.parent)!r} does not exist")
    return path


def _cmd_build(args, console) -> int:
    from .retrieval.corpus import TrainingDataMissing, corpus_file, read_examples
    from .retrieval.text_index import TextIndex

    if (args.file is None) == (args.corpus is None):
        raise ValueError("give either --file FILE or --corpus NAME")
    out = _check_out(args.out)
    if args.file is not None:
        texts, labels = read_rows(args.file, args.column, args.label_column)
        rows, source = {"texts": texts, "labels": labels}, f"file:{Path(args.file).name}"
    else:
        try:
            file = corpus_file(args.corpus, args.data)
        except TrainingDataMissing as err:
            raise FileNotFoundError(f"--corpus {args.corpus}: {err.detail}; pass --data DIR or set AFFECTKIT_DATA") from None
        rows, source = read_examples(args.corpus, file), f"{args.corpus}:{file.name}"
    index = TextIndex.build(rows.pop("texts"), make_encoder(args.encoder), source=source, progress=not args.json,
                            **rows)
    index.save(out)
    summary = {"out": str(out), "rows": len(index), "encoder": index.encoder_name, "source": source,
               "labels": index.label_names, "scores": index.score_names}
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        console.print(f"indexed {len(index)} texts from {source} with {index.encoder_name} -> {out}")
    return 0


def _cmd_search(args, console) -> int:
    from .retrieval.text_index import TextIndex

    if args.k <= 0:
        raise ValueError(f"-k: expected a positive number of results, got {args.k}")
    if not args.query.strip():
        raise ValueError("the query is empty; give some words to search for")
    index = TextIndex.load(args.index)
    if args.label is not None:
        index.check_label(args.label)
    (found,) = index.search([args.query], args.k, encoder=make_encoder(index.encoder_name), labels=args.label)
    result = {"index": args.index, "query": args.query, "label": args.label, "k": args.k,
              "results": [e.as_dict() for e in found]}
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    table = Table(title=f"nearest to {args.query!r}" + (f" with label {args.label!r}" if args.label else ""))
    for col in ("similarity", "text", "labels / scores"):
        table.add_column(col, overflow="fold")
    for e in found:
        extra = ", ".join(e.labels) if e.labels is not None else ""
        if e.scores:
            extra = ", ".join(f"{k} {v:.2f}" for k, v in e.scores.items())
        table.add_row(f"{e.similarity:.3f}", e.text, extra)
    console.print(table)
    return 0


def add_index_commands(sub) -> None:
    from ._text_cli import _guarded
    from .retrieval.corpus import CORPORA

    index = sub.add_parser("index", help="build and search text indexes (retrieval by meaning)",
                           description="Build an index of texts (with optional labels) and search it by meaning, "
                                       "optionally only among texts carrying a label.")
    isub = index.add_subparsers(dest="index_command", required=True)
    p = isub.add_parser("build", help="index the texts of a file or a corpus",
                        description="Embed the texts of a CSV, JSON lines or plain text file (one text a line), or "
                                    "the training split of a corpus, and save them with their labels to --out "
                                    "(one file, written atomically).")
    p.add_argument("--file", "-f", help="CSV (header row), JSON lines, or plain text file")
    p.add_argument("--column", default="text", help="text column / field (default: text)")
    p.add_argument("--label-column", default=None,
                   help="optional label column / field (JSON lines may hold a list of labels)")
    p.add_argument("--corpus", choices=sorted(CORPORA), help="index a corpus' training split instead of a file")
    p.add_argument("--data", default=None, help="corpus folder for --corpus (default: $AFFECTKIT_DATA)")
    p.add_argument("--out", "-o", required=True, help="index file to write")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2", help="sentence-transformers model name or path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(_cmd_build))

    p = isub.add_parser("search", help="the texts of an index nearest to a query",
                        description="Print the k stored texts most similar to QUERY (cosine similarity of "
                                    "sentence embeddings), optionally only those carrying --label.")
    p.add_argument("index", help="index file written by `affectkit index build`")
    p.add_argument("query", help="query text")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument("--label", default=None, help="only texts carrying this label")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guarded(_cmd_search))
