"""The graph kernels' AVX2 and baseline code paths, on any machine: the graph tests run again
in subprocesses with AFFECTKIT_GRAPH_SIMD_LEVEL capping the instruction set (an AVX-512
machine otherwise only ever runs its AVX-512 kernels)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import affectkit._C as C

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("level", [0, 1])
def test_graph_kernels_at_lower_simd_levels(level):
    if C.graph_simd_level() < level:
        pytest.skip(f"this CPU runs the graph kernels at level {C.graph_simd_level()}, below {level}")
    env = dict(os.environ, AFFECTKIT_GRAPH_SIMD_LEVEL=str(level))
    check = subprocess.run([sys.executable, "-c", "import affectkit._C as C; print(C.graph_simd_level())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip() == str(level), check.stderr
    # CPU tests of the graph ops whose kernels depend on the level; CUDA ones skip themselves.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(HERE / "test_graph_ops.py"), "-k",
                           "matches_reference or gradients or float32 or write_every or pool or cheb or without"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
