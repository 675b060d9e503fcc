"""The numpy emulation of the k-NN kernel's wgmma data path (scripts/emulate/knn_wgmma_layout.py):
swizzled copies, descriptors and accumulator coordinates agree on fresh random tiles, and a
planted indexing bug is caught. It stands in for the GPU until the kernel has run on one; it
mirrors the kernel's index arithmetic, so keep the two in step."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "emulate" / "knn_wgmma_layout.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_emulated_wgmma_tiles_match_the_product():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 of 5 cases match" in proc.stdout


@pytest.mark.parametrize("bug", ["loader_swizzle", "b_stage", "k_step", "qloc"])
def test_planted_bugs_are_caught(bug):
    proc = _run("--bug", bug)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout, proc.stdout + proc.stderr
