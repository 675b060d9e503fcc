"""The numpy emulations of the wgmma (sm_90a) kernels' data paths, which check them on machines
without a GPU (the kernels first ran on an H100 on 2026-11-27, where they agreed): the k-NN kernel's (scripts/emulate/knn_wgmma_layout.py:
swizzled copies, descriptors, accumulator coordinates) and graph_conv's
(scripts/emulate/graph_conv_wg_kernel.py: split operands, both products, the Z^T hand-over
in registers, float64 accuracy) and the attention forward's (scripts/emulate/attention_wg_kernel.py: swizzled
Q, K, V, both descriptor walks, limits, online softmax, P repacked as A fragments). Fresh random inputs each run must match, and planted indexing bugs must be
caught. They mirror the kernels' index arithmetic, so keep each in step with its kernel."""

import pathlib
import re
import subprocess
import sys

import pytest

EMULATE = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "emulate"
SCRIPT = EMULATE / "knn_wgmma_layout.py"
GRAPH = EMULATE / "graph_conv_wg_kernel.py"
ATTENTION = EMULATE / "attention_wg_kernel.py"


def _run(script, *args):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def test_emulated_wgmma_tiles_match_the_product():
    proc = _run(SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 cases match" in proc.stdout


@pytest.mark.parametrize("bug", ["loader_swizzle", "b_stage", "k_step", "qloc", "l2_order"])
def test_planted_bugs_are_caught(bug):
    proc = _run(SCRIPT, "--bug", bug)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", [[], ["--wregs"]], ids=["w_shared", "w_registers"])
def test_emulated_graph_conv_wg_matches_float64(mode):
    proc = _run(GRAPH, *mode)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 of 5 cases pass" in proc.stdout


@pytest.mark.parametrize("bug", ["column_block", "pair_order", "k_step", "padding_skipped", "rs_order", "no_permute",
                                 "wregs_rows"])
def test_graph_conv_wg_planted_bugs_are_caught(bug):
    # wregs_rows is a bug of the register path only; pair_order and column_block hit it too.
    proc = _run(GRAPH, *(["--wregs"] if bug == "wregs_rows" else []), "--bug", bug)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("bug", ["pair_order", "column_block"])
def test_graph_conv_wg_register_path_catches_staging_bugs(bug):
    proc = _run(GRAPH, "--wregs", "--bug", bug)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout + proc.stderr


def test_emulated_attention_wg_block_matches_float64():
    proc = _run(ATTENTION)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 cases match" in proc.stdout


@pytest.mark.parametrize("bug", ["vdesc", "kstep", "pa_order", "vstep"])
def test_attention_wg_planted_bugs_are_caught(bug):
    proc = _run(ATTENTION, "--bug", bug)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout, proc.stdout + proc.stderr


def _nvcc():
    import shutil

    default = pathlib.Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (the CUDA toolkit) to compile the probe")
@pytest.mark.parametrize("probe, products", [("wgmma_probe", {"m64n256k16.f32.f16.f16"}),
                                             ("wgmma_attention_probe", {"m64n64k16.f32.bf16.bf16",
                                                                        "m64n128k16.f32.bf16.bf16"}),
                                             ("wgmma_graph_probe", {"m64n64k16.f32.bf16.bf16",
                                                                    "m64n64k8.f32.tf32.tf32"})])
def test_wgmma_probe_builds_for_sm90a(tmp_path, probe, products):
    # The probes run wgmma layouts alone on a GPU machine (gpu_check.sh step "probe"); here each
    # must assemble for sm_90a, with its products really there (the helpers compile to nothing
    # where the sm_90a features are off).
    root = SCRIPT.parents[2]
    common = [_nvcc(), "-std=c++17", "-O3", "-I", str(root / "csrc"), str(root / "scripts" / "probe" / f"{probe}.cu")]
    ptx = subprocess.run(common + ["-arch=sm_90a", "-ptx", "-o", str(tmp_path / "p.ptx")],
                         capture_output=True, text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr[-3000:]
    found = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", (tmp_path / "p.ptx").read_text()))
    assert found == products
    proc = subprocess.run(common + ["-gencode", "arch=compute_90a,code=sm_90a", "-o", str(tmp_path / "probe")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "probe").stat().st_size > 0
