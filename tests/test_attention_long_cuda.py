"""The long-sequence tensor-core forward (csrc/attention/cross_attention_tc_long.cu) against a
float64 reference: fp16/bf16, D = Dv = 64 or 128, no attn_mask, 128-row blocks of 32 rows a
warp. It runs when Lq, Lk >= 256 and B * H * ceil(Lq / 128) >= 2 * multiprocessors, so the
shapes here have enough heads to fill any GPU twice; lengths are not multiples of the 128-row
or 64-key tiles. With AFFECTKIT_ATTENTION_LONG_KERNEL=0 (read once per process, so that run
is this file again in a subprocess) the same checks run the general tensor-core kernel.
Outputs and lse are poisoned (NaN) before each call through the core."""

import math
import os
import subprocess
import sys

import pytest
import torch

import affectkit._C as C
from affectkit.ops._bridge import ptr
from affectkit.selfcheck import rel_error

from _support import requires_cuda

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _heads(B: int, Lq: int) -> int:
    """Heads enough that the dispatcher picks the long kernel on this GPU."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return math.ceil(2 * sms / (B * math.ceil(Lq / 128)))


def _reference(q, k, v, qlen, klen, causal, scale, padded):
    """Float64 softmax(scale q k^T) v and logsumexp over the visible keys of each sequence
    (q, k, v: lists of (H, L, D) per sequence); rows with no visible key: zeros and +inf. The
    causal diagonal is bottom-right aligned on the padded lengths in the padded form, on each
    sequence's own lengths in the packed one."""
    outs, lses = [], []
    for qb, kb, vb, lq, lk in zip(q, k, v, qlen, klen):
        s = (qb.double() @ kb.double().transpose(-1, -2)) * scale
        Lq, Lk = s.shape[-2:]
        i = torch.arange(Lq, device=s.device)[:, None]
        j = torch.arange(Lk, device=s.device)[None, :]
        allowed = (j < lk) & (i < lq)
        if causal:
            allowed = allowed & (j <= i + ((Lk - Lq) if padded else (lk - lq)))
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
        outs.append(p @ vb.double())
        lses.append(torch.where(torch.isfinite(lse), lse, math.inf))
    return outs, lses


def _view(t):  # (B, H, L, D) padded form: element strides (b, h, row)
    return (ptr(t), t.stride(0), t.stride(1), t.stride(2))


def _run_padded(q, k, v, kvl, ql, causal, scale):
    B, H, Lq, D = q.shape
    out = torch.full((B, H, Lq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Lq), float("nan"), dtype=torch.float32, device=q.device)
    index = (ptr(ql) if ql is not None else 0, ptr(kvl) if kvl is not None else 0, 0, 0, 0, 0)
    no_mask = (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0)
    dtype = C.DTYPE_CODES["float16" if q.dtype == torch.float16 else "bfloat16"]
    C.attention_forward(C.DEVICE_CUDA, dtype, (B, H, Lq, k.shape[2], D, v.shape[-1]), index, causal, scale, 0.0, 0,
                        _view(q), _view(k), _view(v), no_mask, _view(out), (ptr(lse), lse.stride(0), lse.stride(1),
                                                                             lse.stride(2)),
                        torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out, lse


def _check(got_out, got_lse, want_out, want_lse, dtype):
    assert not torch.isnan(got_out).any() and not torch.isnan(got_lse).any()  # every element written
    assert rel_error(got_out.double(), want_out) <= TOL[dtype]
    inf = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(got_lse), inf)
    assert (got_out.double()[inf] == 0).all()
    finite = want_lse[~inf]
    if finite.numel():
        scale = max(1.0, float(finite.abs().max()))
        assert torch.allclose(got_lse.double()[~inf], finite, rtol=0, atol=2e-3 * scale)


CASES = [  # B, Lq, Lk, D
    (2, 383, 450, 64),
    (2, 257, 300, 128),
    (1, 512, 256, 64),
    (2, 300, 777, 128),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("variant", ["none", "lengths", "causal", "causal_lengths"])
def test_long_forward_matches_reference(dtype, case, variant, gen):
    B, Lq, Lk, D = case
    H = _heads(B, Lq)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to("cuda", dtype) for L in (Lq, Lk, Lk))
    kvl = ql = None
    if "lengths" in variant:  # a sequence with no key and one with keys ending mid-tile
        kvl = torch.tensor([0, 65] if B > 1 else [Lk - 1]).cuda()
        ql = torch.tensor([Lq, 129] if B > 1 else [Lq - 3]).cuda()
    causal = "causal" in variant
    scale = 0.7 if variant == "causal" else 1 / math.sqrt(D)
    out, lse = _run_padded(q, k, v, kvl, ql, causal, scale)
    qlen = ql.tolist() if ql is not None else [Lq] * B
    klen = kvl.tolist() if kvl is not None else [Lk] * B
    want_out, want_lse = _reference(q, k, v, qlen, klen, causal, scale, padded=True)
    _check(out, lse, torch.stack(want_out), torch.stack(want_lse), dtype)


@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_long_forward_varlen(D, gen):
    dtype = torch.bfloat16
    lq = torch.tensor([300, 0, 257, 1, 400])
    lk = torch.tensor([290, 5, 0, 64, 513])
    H = _heads(len(lq), int(lq.max()))
    q = torch.randn(int(lq.sum()), H, D, generator=gen).to("cuda", dtype)
    k = torch.randn(int(lk.sum()), H, D, generator=gen).to("cuda", dtype)
    v = torch.randn(int(lk.sum()), H, D, generator=gen).to("cuda", dtype)
    cu = lambda n: torch.cat([torch.zeros(1, dtype=torch.int64), n.cumsum(0)]).cuda()  # noqa: E731
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    lse = torch.full(q.shape[:2], float("nan"), device="cuda")
    view = lambda t: (ptr(t), 0, t.stride(1), t.stride(0))  # noqa: E731
    cq, ck = cu(lq), cu(lk)
    dims = (len(lq), H, int(lq.max()), int(lk.max()), D, D)
    C.attention_forward(C.DEVICE_CUDA, C.DTYPE_CODES["bfloat16"], dims, (0, 0, ptr(cq), ptr(ck), q.shape[0], k.shape[0]),
                        True, 1 / math.sqrt(D), 0.0, 0, view(q), view(k), view(v), (0, C.DTYPE_CODES["bool"], 0, 0, 0, 0),
                        view(out), (ptr(lse), 0, lse.stride(1), lse.stride(0)), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    split = lambda t, n: [x.transpose(0, 1) for x in torch.split(t, n.tolist())]  # noqa: E731
    want_out, want_lse = _reference(split(q, lq), split(k, lk), split(v, lk), lq.tolist(), lk.tolist(), True,
                                    1 / math.sqrt(D), padded=False)
    _check(out, lse, torch.cat([o.transpose(0, 1) for o in want_out]),
           torch.cat([x.transpose(0, 1) for x in want_lse]), dtype)


@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_rows_past_q_lengths_stay_zero_when_v_holds_an_infinity(D, gen):
    # Rows 200.. of sequence 0 are padding, in the same warps and blocks as valid rows that see
    # the infinite V row: they multiply P = 0 by it, and 0 * inf = NaN must not reach them.
    B, Lq, Lk = 2, 257, 300
    H = _heads(B, Lq)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to("cuda", torch.bfloat16) for L in (Lq, Lk, Lk))
    v[:, :, 3] = float("inf")
    out, lse = _run_padded(q, k, v, None, torch.tensor([200, Lq]).cuda(), False, 1 / math.sqrt(D))
    assert not torch.isfinite(out[0, :, 192:200]).any()  # the infinity did reach the valid rows
    assert (out[0, :, 200:] == 0).all() and torch.isinf(lse[0, :, 200:]).all()


LONG_KERNEL_OFF = os.environ.get("AFFECTKIT_ATTENTION_LONG_KERNEL") == "0"
# D = 128 on wgmma (the default where it can run; AFFECTKIT_ATTENTION_WGMMA=0 turns it off)
WGMMA_OFF = os.environ.get("AFFECTKIT_ATTENTION_WGMMA") == "0"
# The wgmma kernel overlaps each tile's softmax with the previous tile's O += P V by default;
# AFFECTKIT_ATTENTION_WG_PIPELINE=0 keeps its first, serial order.
PIPELINE_SET = os.environ.get("AFFECTKIT_ATTENTION_WG_PIPELINE") is not None
RERUN = LONG_KERNEL_OFF or WGMMA_OFF or PIPELINE_SET


def _wgmma_possible() -> bool:
    """The wgmma forward can run here: a compute capability 9.0 device and a build with sm_90a."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0)
            and "90a-real" in C.build_info()["cuda_architectures"].split(";"))


@requires_cuda
def test_the_expected_kernel_runs(gen):
    # The shapes above must reach the kernel under test, or they test nothing new.
    B, Lq, Lk, D = 2, 383, 450, 64
    H = _heads(B, Lq)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to("cuda", torch.float16) for L in (Lq, Lk, Lk))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _run_padded(q, k, v, None, None, False, 0.125)
    names = [e.name for e in prof.events()]
    long_names = [n for n in names if "tc_forward_long_kernel" in n]
    general_ran = any("tc_forward_kernel" in n for n in names)
    assert (bool(long_names), general_ran) == ((False, True) if LONG_KERNEL_OFF else (True, False)), names


@requires_cuda
def test_the_expected_kernel_runs_at_d128(gen):
    # By default D = 128 must reach the wgmma kernel wherever it can run (not fall back to the
    # long kernel unnoticed), and nowhere else; AFFECTKIT_ATTENTION_WGMMA=0 keeps the long kernel.
    B, Lq, Lk, D = 2, 257, 300, 128
    H = _heads(B, Lq)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to("cuda", torch.bfloat16) for L in (Lq, Lk, Lk))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _run_padded(q, k, v, None, None, True, 0.1)
    names = [e.name for e in prof.events()]
    wg = any("wg_forward_kernel" in n for n in names)
    long = any("tc_forward_long_kernel" in n for n in names)
    if LONG_KERNEL_OFF:
        assert not wg and not long, names
    else:
        expect_wg = not WGMMA_OFF and _wgmma_possible()
        assert (wg, long) == (expect_wg, not expect_wg), names


def _rerun_this_file(**env):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


@requires_cuda
@pytest.mark.skipif(RERUN, reason="this is already a run with another setting")
def test_general_kernel_matches_reference_on_the_same_shapes():
    _rerun_this_file(AFFECTKIT_ATTENTION_LONG_KERNEL="0")


@requires_cuda
@pytest.mark.skipif(RERUN, reason="this is already a run with another setting")
def test_long_kernel_at_d128_matches_reference_where_wgmma_is_the_default():
    # Where wgmma takes D = 128 by default, the long kernel still serves it on other GPUs and
    # with AFFECTKIT_ATTENTION_WGMMA=0: run the same shapes through it.
    if not _wgmma_possible():
        pytest.skip("the long kernel already ran D = 128 here: wgmma needs compute capability 9.0 and sm_90a")
    _rerun_this_file(AFFECTKIT_ATTENTION_WGMMA="0")


@requires_cuda
@pytest.mark.skipif(RERUN, reason="this is already a run with another setting")
def test_serial_wgmma_order_matches_reference_on_the_same_shapes():
    # The pipelined order is the default; the serial one stays selectable (and runs wherever
    # 224 KB of shared memory cannot be had), so it is checked on the same shapes.
    if not _wgmma_possible():
        pytest.skip("the wgmma kernel needs compute capability 9.0 and a build with sm_90a")
    _rerun_this_file(AFFECTKIT_ATTENTION_WG_PIPELINE="0")


def _bad_setting_message(var: str, value: str) -> str:
    """What a D = 128 forward prints under var=value: the ValueError's text, or nothing."""
    code = ("import torch, affectkit.ops as ops\n"
            "q = torch.ones(2, 132, 300, 128, device='cuda', dtype=torch.float16)\n"
            "try:\n"
            "    ops.cross_modal_attention(q, q, q)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    # The long kernel and the wgmma kernel read these, so they must be on even inside reruns.
    drop = ("AFFECTKIT_ATTENTION_LONG_KERNEL", "AFFECTKIT_ATTENTION_WGMMA", "AFFECTKIT_ATTENTION_WG_PIPELINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    run = subprocess.run([sys.executable, "-c", code], env=dict(env, **{var: value}),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@requires_cuda
def test_bad_pipeline_value_raises_value_error():
    if not _wgmma_possible():
        pytest.skip("AFFECTKIT_ATTENTION_WG_PIPELINE is read only where the wgmma kernel runs")
    out = _bad_setting_message("AFFECTKIT_ATTENTION_WG_PIPELINE", "2")  # a mode that is gone
    assert "ValueError:" in out and "AFFECTKIT_ATTENTION_WG_PIPELINE" in out, out


@requires_cuda
def test_bad_wgmma_value_raises_value_error():
    if "90a-real" not in C.build_info()["cuda_architectures"].split(";"):
        pytest.skip("AFFECTKIT_ATTENTION_WGMMA is read only by builds with sm_90a (90a-real)")
    out = _bad_setting_message("AFFECTKIT_ATTENTION_WGMMA", "yes")
    assert "ValueError:" in out and "AFFECTKIT_ATTENTION_WGMMA" in out, out
