"""Key groups in the tensor-core forward (csrc/attention/cross_attention_tc.cu): the warps of a
block split every staged tile of 64 * groups keys between them, and each group's softmax state
(running max, sum and output) merges into group 0 at the end. Checked against a float64
reference with outputs and lse poisoned (NaN) before the call, at the setting of this process
(AFFECTKIT_ATTENTION_KEY_GROUPS, read once), and by rerunning this file and the tensor-core
forward tests of test_cross_modal_attention.py under every forced setting."""

import json
import os
import subprocess
import sys

import pytest
import torch

import affectkit.ops as ops

from _support import requires_cuda
from test_attention_long_cuda import _check, _reference, _run_padded

SETTING = os.environ.get("AFFECTKIT_ATTENTION_KEY_GROUPS", "auto")

CASES = [  # B, H, Lq, Lk, D
    (1, 1, 1, 65, 6),      # one row, a key tile and one key
    (2, 3, 50, 500, 6),    # MulT's 50 x 500: eight 64-key tiles, 2 or 1 staged tiles per group
    (2, 2, 33, 129, 64),   # three key tiles: groups with nothing to do in the last staged tile
    (3, 1, 17, 1000, 32),
    (1, 2, 130, 257, 128), # the largest buckets: shared memory may cap the groups
    (2, 1, 70, 200, 14),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("variant", ["none", "lengths", "causal", "causal_lengths"])
def test_forward_matches_reference(dtype, case, variant, gen):
    B, H, Lq, Lk, D = case
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to("cuda", dtype) for L in (Lq, Lk, Lk))
    kvl = ql = None
    if "lengths" in variant:  # a sequence with no key, one ending mid-tile, one row short
        kvl = torch.tensor([0, 65, Lk - 1][:B] if B > 1 else [Lk - 1]).cuda()
        ql = torch.tensor([Lq, max(Lq - 7, 0), 1][:B] if B > 1 else [Lq]).cuda()
    causal = "causal" in variant
    scale = 0.7 if variant == "causal" else D ** -0.5
    out, lse = _run_padded(q, k, v, kvl, ql, causal, scale)
    qlen = ql.tolist() if ql is not None else [Lq] * B
    klen = kvl.tolist() if kvl is not None else [Lk] * B
    want_out, want_lse = _reference(q, k, v, qlen, klen, causal, scale, padded=True)
    _check(out, lse, torch.stack(want_out), torch.stack(want_lse), dtype)


def _block_sizes(fn):
    """The CUDA block sizes of the tc_forward_kernel launches that fn makes (from the profiler's
    trace, which records each kernel's launch configuration)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"affectkit_trace_{os.getpid()}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    return [e.get("args", {}).get("block") for e in events if "tc_forward_kernel" in e.get("name", "")]


@requires_cuda
def test_the_dispatcher_splits_keys_where_blocks_are_few():
    # MulT's 32 x 8 x 50 x 500 (256 blocks of 64 rows) leaves every multiprocessor short of
    # warps: by default two key groups (8 warps) take it; 33 x 33 (one key tile) keeps 4 warps.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    mult = [torch.randn(32, 8, L, 6, device="cuda", dtype=torch.bfloat16) for L in (50, 500, 500)]
    short = [torch.randn(64, 8, 33, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    want = {"auto": [256, 1, 1] if 256 < 4 * sms else [128, 1, 1], "1": [128, 1, 1], "2": [256, 1, 1],
            "4": [256, 1, 1]}[SETTING]
    assert _block_sizes(lambda: ops.cross_modal_attention(*mult)) == [want]
    want_short = [128, 1, 1] if SETTING in ("auto", "1") else [256, 1, 1]
    assert _block_sizes(lambda: ops.cross_modal_attention(*short)) == [want_short]


def _pytest(args, setting):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                         env=dict(os.environ, AFFECTKIT_ATTENTION_KEY_GROUPS=setting), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


@requires_cuda
@pytest.mark.skipif(SETTING != "auto", reason="this is already a run with a forced setting")
@pytest.mark.parametrize("setting", ["1", "2", "4"])
def test_every_forced_setting_matches_reference(setting):
    here = os.path.dirname(__file__)
    _pytest([__file__, os.path.join(here, "test_cross_modal_attention.py"), "-k",
             "tensor_core_forward or forward_matches_reference or splits_keys"], setting)


@requires_cuda
def test_bad_setting_raises_value_error():
    code = ("import torch, affectkit.ops as ops\n"
            "q = torch.ones(1, 1, 5, 8, device='cuda', dtype=torch.float16)\n"
            "try:\n"
            "    ops.cross_modal_attention(q, q, q)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, AFFECTKIT_ATTENTION_KEY_GROUPS="3"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ValueError:" in run.stdout and "AFFECTKIT_ATTENTION_KEY_GROUPS" in run.stdout, run.stdout
