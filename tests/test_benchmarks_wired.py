"""The benchmark suite is collected and runnable (it runs once as a smoke test)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_compares_with_a_stock_baseline():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", str(ROOT / "benchmarks")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids, "no benchmarks collected"
    # Each benchmark group measures affectkit and the stock path in the same run.
    assert any("affectkit" in i for i in ids) and any("torch" in i for i in ids)
