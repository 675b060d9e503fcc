"""The hottest SASS instructions of an Nsight Compute source page (`ncu --import R --page
source --csv --print-source sass`), by warp-stall samples, with each one's leading stall
reasons: where a kernel's warps wait, which the sections' totals do not say.

    python3 scripts/ncu_hot_lines.py ncu_source.csv [TOP]
"""

import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path, top=40):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu prints its own notes before the table; the header is the first row naming "Source".
    start = next((i for i, line in enumerate(lines) if '"Source"' in line or line.startswith("Source")), None)
    if start is None:
        print(f"{path}: no source table (first lines: {lines[:5]})")
        return 1
    rows = list(csv.DictReader(lines[start:]))
    header = list(rows[0].keys()) if rows else []
    samples = next((c for c in header if "Stall Sampling (All" in c), None) or \
        next((c for c in header if "Sampling" in c), None)
    if samples is None:
        print(f"{path}: no stall-sampling column among {header}")
        return 1
    reasons = [c for c in header if c.lower().startswith("stall") or "stall_" in c.lower()]
    total = sum(number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} samples ({samples}); columns: {header}")
    for r in sorted(rows, key=lambda r: -number(r[samples]))[:top]:
        lead = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:3]
        why = ", ".join(f"{c} {v:.0f}" for v, c in lead if v > 0)
        where = r.get("Address", "") or r.get("#", "")
        print(f"{100 * number(r[samples]) / total:5.1f}%  {where:>8}  {r.get('Source', '')[:70]:70}  {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40))
