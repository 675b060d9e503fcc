"""benchmarks/gpu_targets.py's verdict column, which a GPU session reads to decide what ships:
time targets count the graph-replay (GPU) time where there is one, ratio targets stock /
affectkit."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_targets  # noqa: E402


def _row(target, ours_us, stock_us=100.0, ours_graph_us=None):
    return dict(target=target, ours_us=ours_us, stock_us=stock_us, ours_graph_us=ours_graph_us)


@pytest.mark.parametrize("row, want", [
    (_row("< 15 us", 80.0, ours_graph_us=14.9), "yes"),   # eager is host-bound; the GPU time counts
    (_row("< 15 us", 10.0, ours_graph_us=15.0), "no"),    # strictly under
    (_row("< 2 ms", 1999.0), "yes"),
    (_row("< 2 ms", 2140.0), "no"),
    (_row(">= 0.5x SDPA", 1644.0, stock_us=822.0), "yes"),
    (_row(">= 0.5x SDPA", 1932.0, stock_us=822.0), "no"),
    (_row("", 1.0), ""),
])
def test_verdict(row, want):
    assert gpu_targets.verdict(row) == want
