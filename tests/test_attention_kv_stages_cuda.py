"""The multi-stage K/V pipeline of the tensor-core attention forward (csrc/attention/
cross_attention_tc.cu, kMulti): opt-in through AFFECTKIT_ATTENTION_KV_STAGES=N (read once per
process, so each setting runs in a subprocess). It takes D, Dv <= 32 with more than two key
tiles, so the tensor-core forward tests of test_cross_modal_attention.py (MulT's 50 x 500 at D =
6, 20 x 900 at D = 32 among them) run again under it: 3 stages wrap around 8 and 15 key tiles,
8 stages are capped by the 64 KB budget (6 at D = Dv = 32)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import affectkit

from _support import requires_cuda

pytestmark = requires_cuda
HERE = Path(__file__).resolve().parent


def _env(value):
    env = dict(os.environ, AFFECTKIT_ATTENTION_KV_STAGES=value)
    python_dir = str(Path(affectkit.__file__).resolve().parents[1])  # the package this process imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("stages", ["3", "8"])
def test_multi_stage_forward_matches_reference(stages):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(HERE / "test_cross_modal_attention.py"), "-k", "tensor_core_forward or tensor_core_backward"],
                         env=_env(stages), capture_output=True, text=True, timeout=600, cwd=HERE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout.split("\n")[-2], run.stdout[-500:]


PROFILE = r"""
import torch, affectkit.ops as ops
q = torch.randn(4, 8, 50, 6, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(4, 8, 500, 6, device="cuda", dtype=torch.bfloat16) for _ in range(2))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    ops.cross_modal_attention(q, k, v, kv_lengths=torch.tensor([500, 3, 0, 257], device="cuda"))
    torch.cuda.synchronize()
print([e.name for e in prof.events() if "tc_forward_kernel" in e.name])
"""


@pytest.mark.parametrize("stages, multi", [("8", True), ("", False)])
def test_the_expected_kernel_runs(stages, multi):
    run = subprocess.run([sys.executable, "-c", PROFILE], env=_env(stages), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    names = run.stdout
    assert "tc_forward_kernel" in names, names
    assert (", true>" in names) == multi and (", false>" in names) != multi, names


def test_bad_value_raises_value_error():
    code = ("import torch, affectkit.ops as ops\n"
            "q = torch.ones(1, 1, 5, 6, device='cuda', dtype=torch.float16)\n"
            "try:\n"
            "    ops.cross_modal_attention(q, q, q)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], env=_env("9"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ValueError:" in run.stdout and "AFFECTKIT_ATTENTION_KV_STAGES" in run.stdout, run.stdout
