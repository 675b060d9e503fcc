"""The CPU kernels' AVX2 and baseline code paths, on any machine: the CPU tests of each kernel
family run again in subprocesses with AFFECTKIT_SIMD_LEVEL capping the instruction set (an
AVX-512 machine otherwise only ever runs its AVX-512 copies, and an AVX2 machine its AVX2
ones). Each copy is compiled with vectors of its own width, so each is a different program."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import affectkit._C as C

HERE = Path(__file__).resolve().parent

# (test file, -k expression): the CPU tests whose kernels depend on the level; CUDA tests skip
# themselves in the subprocess as they do here.
FAMILIES = {
    "attention": ("test_cross_modal_attention.py", "not cuda and not compile"),
    "graph": ("test_graph_ops.py",
              "matches_reference or gradients or float32 or write_every or pool or cheb or without"),
    "knn": ("test_exact_knn.py", "not cuda"),
    "knn_long_lists": ("test_knn_long_lists.py", "not cuda"),
    "walk_codes": ("test_walk_codes.py", "code_distances or walking"),
}


def _level_in_child(env, attr):
    out = subprocess.run([sys.executable, "-c", f"import affectkit._C as C; print(C.{attr}())"],
                         env=env, capture_output=True, text=True, timeout=300)
    return out.stdout.strip(), out.stderr


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("level", [0, 1])
def test_kernels_at_lower_simd_levels(level, family):
    if C.simd_level() < level:
        pytest.skip(f"this CPU runs the kernels at level {C.simd_level()}, below {level}")
    env = dict(os.environ, AFFECTKIT_SIMD_LEVEL=str(level))
    assert _level_in_child(env, "simd_level")[0] == str(level)
    assert _level_in_child(env, "graph_simd_level")[0] == str(level)
    path, expr = FAMILIES[family]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(HERE / path), "-k", expr],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_graph_cap_applies_to_the_graph_kernels_alone():
    if C.simd_level() < 1:
        pytest.skip("this CPU has no level above the baseline to cap")
    env = dict(os.environ, AFFECTKIT_GRAPH_SIMD_LEVEL="0")
    assert _level_in_child(env, "graph_simd_level")[0] == "0"
    assert _level_in_child(env, "simd_level")[0] == str(C.simd_level())


@pytest.mark.parametrize("value", ["7", "-1", "avx2", "11"])
def test_a_cap_it_cannot_read_changes_nothing(value):
    env = dict(os.environ, AFFECTKIT_SIMD_LEVEL=value)
    assert _level_in_child(env, "simd_level")[0] == str(C.simd_level())


def test_info_names_the_copy_in_use():
    env = dict(os.environ, AFFECTKIT_SIMD_LEVEL="0")
    out = subprocess.run([sys.executable, "-c", "import affectkit; print(affectkit.info()['simd_kernels'])"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "baseline", out.stderr
    import affectkit

    assert affectkit.info()["simd_kernels"] == ("baseline", "avx2+fma", "avx512")[C.simd_level()]
