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


def _nvcc():
    import shutil

    default = pathlib.Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (the CUDA toolkit) to compile the probe")
def test_wgmma_probe_builds_for_sm90a(tmp_path):
    # scripts/probe/wgmma_probe.cu runs the kernel's wgmma helpers alone on a GPU machine
    # (gpu_check.sh step "probe"); here it must at least assemble for sm_90a.
    root = SCRIPT.parents[2]
    proc = subprocess.run([_nvcc(), "-std=c++17", "-O3", "-gencode", "arch=compute_90a,code=sm_90a",
                           "-I", str(root / "csrc"), str(root / "scripts" / "probe" / "wgmma_probe.cu"),
                           "-o", str(tmp_path / "probe")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "probe").stat().st_size > 0
