"""The `affectkit` command line."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table


def _cmd_info(args: argparse.Namespace, console: Console) -> int:
    from . import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title="affectkit", show_header=False)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)
    return 0


def _cmd_selfcheck(args: argparse.Namespace, console: Console) -> int:
    try:
        from . import selfcheck
    except ImportError as err:  # torch missing
        console.print(f"[red]selfcheck needs torch: {err}[/red]")
        return 2
    results = selfcheck.run(seed=args.seed)
    if args.json:
        print(json.dumps([r.__dict__ | {"ok": r.ok} for r in results], indent=2))
    else:
        table = Table(title="affectkit selfcheck (relative error against float64)")
        for col in ("op", "device", "dtype", "rel. error", "tolerance", "result"):
            table.add_column(col)
        for r in results:
            verdict = "[green]ok[/green]" if r.ok else "[red]FAIL[/red]"
            table.add_row(r.op, r.device, r.dtype, f"{r.rel_error:.2e}", f"{r.tolerance:.0e}", verdict)
        console.print(table)
    return 0 if all(r.ok for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affectkit", description="Emotion recognition toolkit",
                                     epilog="EEG models: affectkit train eeg --help")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, build configuration, devices")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("selfcheck", help="check every op against a float64 reference")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.set_defaults(func=_cmd_selfcheck)

    from ._text_cli import add_text_commands

    add_text_commands(sub)
    from ._index_cli import add_index_commands

    add_index_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["train", "eeg"]:  # EEG training has its own options (see _eeg_cli)
        from ._eeg_cli import main as train_eeg

        return train_eeg(argv[2:], Console())
    args = build_parser().parse_args(argv)
    return args.func(args, Console())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
