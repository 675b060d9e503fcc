"""graph_conv's CUDA forward kernels, each forced with AFFECTKIT_GRAPH_CUDA_PATH.

The variable is read once per process, so every path runs in its own subprocess: a shape sweep
at awkward sizes (padding, tile remainders, several tiles per block) against a float64
reference, with the output poisoned (NaN) before the raw op writes it; a large-dynamic-range
case that plain TF32 would fail (the tensor-core paths must keep float32 accuracy); and calls
the tensor-core paths cannot take (float64, per-sample graphs, N = 65), which fall back.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import affectkit

from _support import requires_cuda

pytestmark = requires_cuda

PATHS = ["auto", "tiled", "warp", "tc", "tc3", "wg"]  # wg: wgmma, sm_90a
TOL = 1e-5

SCRIPT = r"""
import itertools, sys
import torch
import torch.nn.functional as Fn
import affectkit._C as C
from affectkit.ops._bridge import ptr
from affectkit.selfcheck import rel_error

seed, tol = int(sys.argv[1]), float(sys.argv[2])
gen = torch.Generator(device="cuda").manual_seed(seed)
ACT = {0: lambda t: t, 1: torch.relu, 2: Fn.elu, 3: Fn.leaky_relu, 4: torch.tanh, 5: torch.sigmoid}
failures = []


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64).to(dtype)


def raw(x, A, W, b, act):
    # Raw op into a NaN-poisoned output: every element must be written.
    S, N, F = x.shape
    Fo, B = W.shape[1], A.shape[0]
    out = torch.full((S, N, Fo), float("nan"), device="cuda", dtype=x.dtype)
    C.graph_conv_forward(C.DEVICE_CUDA, C.DTYPE_CODES[str(x.dtype).removeprefix("torch.")], ptr(x), ptr(A),
                         ptr(W), ptr(b) if b is not None else 0, ptr(out), S, N, F, Fo, B, act,
                         torch.cuda.current_stream().cuda_stream)
    return out


def reference(x, A, W, b, act):
    S, N, F = x.shape
    Fo, B = W.shape[1], A.shape[0]
    y = A.double().unsqueeze(1) @ x.double().reshape(B, S // B, N, F) @ W.double()
    return ACT[act](y.reshape(S, N, Fo) + (b.double() if b is not None else 0))


def check(name, x, A, W, b, act):
    S, N, F = x.shape
    Fo, B = W.shape[1], A.shape[0]
    out, want = raw(x, A, W, b, act), reference(x, A, W, b, act)
    err = rel_error(out, want)
    if not err <= tol:
        failures.append(f"{name}: S={S} N={N} F={F} Fo={Fo} B={B} act={act} bias={b is not None}: {err:.3g}")
    return err


# Shape sweep: every N with every (F, Fo) pair; S, bias and activation cycle.
NS = [1, 13, 14, 17, 31, 32, 62, 64]
# F = 12, 36, 60: multiples of 4 that fill a 128-byte column block only partly (the wg kernel).
FFO = [(1, 1), (5, 32), (7, 33), (32, 32), (33, 7), (64, 64), (64, 5), (32, 64), (1, 64), (64, 1), (12, 33),
       (36, 7), (60, 64)]
for i, (N, (F, Fo)) in enumerate(itertools.product(NS, FFO)):
    S = [1, 7, 8195][i % 3]
    x, A, W = randn(S, N, F), randn(1, N, N) / N**0.5, randn(F, Fo) / F**0.5
    check("sweep", x, A, W, randn(Fo) if i % 2 else None, i % 6)

# Large dynamic range (magnitudes 1e-3 .. 1e3): plain TF32 (10 mantissa bits) misses TOL by far,
# shown by emulating it; a tensor-core path that skipped the split would fail here.
S, N, F, Fo = 515, 62, 64, 64
spread = lambda *s: randn(*s) * torch.exp(randn(*s) * 2.3)  # noqa: E731
x, A, W, b = spread(S, N, F), spread(1, N, N) / N**0.5, spread(F, Fo) / F**0.5, randn(Fo)
tf32 = lambda t: (t.float().contiguous().view(torch.int32) & -8192).view(torch.float32).double()  # noqa: E731
plain_err = rel_error(tf32(A) @ tf32(tf32(x) @ tf32(W)), A.double() @ x.double() @ W.double())
if not plain_err > 20 * tol:
    failures.append(f"dynamic range: plain TF32 emulation error {plain_err:.3g} does not exceed {20 * tol}")
check("dynamic range", x, A, W, b, 0)

# An infinity in a few samples stays there. The tensor-core kernels loop over samples through
# the same shared buffers (more samples than resident blocks here), so a stale padding column
# would turn it into NaN in a later sample.
S, N, F, Fo = 4001, 62, 36, 64
x, A, W, b = randn(S, N, F), randn(1, N, N) / N**0.5, randn(F, Fo) / F**0.5, randn(Fo)
bad = torch.arange(0, S, 397, device="cuda")
x[bad, 5, 3] = float("inf")
out, want = raw(x, A, W, b, 0), reference(x, A, W, b, 0)
keep = torch.ones(S, dtype=torch.bool, device="cuda")
keep[bad] = False
err = rel_error(out[keep], want[keep])
if not (bool(torch.isfinite(out[keep]).all()) and err <= tol):
    failures.append(f"infinity in {bad.numel()} samples: the others non-finite or off by {err:.3g}")

# Calls the tensor-core kernels cannot take fall back to the others.
check("float64", randn(9, 14, 32, dtype=torch.float64), randn(1, 14, 14, dtype=torch.float64),
      randn(32, 32, dtype=torch.float64), None, 1)
check("per-sample graphs", randn(12, 14, 32), randn(3, 14, 14), randn(32, 32), randn(32), 1)
check("N = 65", randn(5, 65, 16), randn(1, 65, 65) / 65**0.5, randn(16, 8), None, 2)
torch.cuda.synchronize()
print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
"""


def _run(path, *args, **knobs):
    env = dict(os.environ, AFFECTKIT_GRAPH_CUDA_PATH=path, **knobs)
    python_dir = str(Path(affectkit.__file__).resolve().parents[1])  # the package this process imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("path", PATHS)
def test_forced_path_matches_float64(path, gen):
    seed = int(torch.randint(2**31, (1,), generator=gen))
    proc = _run(path, SCRIPT, str(seed), str(TOL))
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout}\n{proc.stderr[-3000:]}"


# The kernels one float32 call of 300 samples of N x F -> Fo runs, by name.
KERNEL_NAMES = (
    "import sys, torch, affectkit.ops as ops\n"
    "N, F, Fo = map(int, sys.argv[1:])\n"
    "x = torch.randn(300, N, F, device='cuda')\n"
    "A, W = torch.randn(N, N, device='cuda'), torch.randn(F, Fo, device='cuda')\n"
    "with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:\n"
    "    ops.graph_conv(x, A, W)\n"
    "print(sorted({e.name for e in prof.events() if 'conv_kernel' in e.name}))\n"
)


def _wgmma_possible() -> bool:
    """The wg kernel can run here: compute capability 9.0 and a build with sm_90a."""
    import affectkit._C as C

    return (torch.cuda.get_device_capability(0) == (9, 0)
            and "90a-real" in C.build_info()["cuda_architectures"].split(";"))


@pytest.mark.parametrize("path, shape, kernel", [
    ("auto", (62, 64, 64), "wg_conv_kernel"),  # real products 95 % of wg's padded ones
    ("auto", (40, 64, 64), "wg_conv_kernel"),  # 50.8 %
    ("auto", (39, 64, 64), "tc_conv_kernel"),  # 49.0 %: tc is faster
    ("auto", (14, 32, 32), "tc_conv_kernel"),
    ("auto", (62, 63, 64), "tc_conv_kernel"),  # F % 4 != 0: wg cannot take it
    ("tc", (62, 64, 64), "tc_conv_kernel"),
    ("wg", (62, 64, 64), "wg_conv_kernel"),
    ("wg", (14, 32, 32), "wg_conv_kernel")])
def test_path_runs_its_kernel(path, shape, kernel):
    # A forced path that cannot take a call falls back silently; the sweep above would then
    # test another kernel. An H100/H200 is compute capability 9.0, where wg must run; elsewhere
    # tc takes wg's calls.
    if kernel == "wg_conv_kernel" and not _wgmma_possible():
        kernel = "tc_conv_kernel"
    proc = _run(path, KERNEL_NAMES, *map(str, shape))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout.strip().splitlines()[-1]
    assert kernel in names and names.count("conv_kernel") == 1, names


# One float32 graph_conv call that the tensor-core path would take; prints a ValueError's message.
CALL_PRINTING_VALUE_ERROR = (
    "import torch, affectkit.ops as ops\n"
    "x = torch.ones(4, 14, 32, device='cuda')\n"
    "try:\n"
    "    ops.graph_conv(x, torch.eye(14, device='cuda'), torch.ones(32, 32, device='cuda'))\n"
    "except ValueError as e:\n"
    "    print('ValueError:', e)\n"
)


# The tensor-core kernel's timing knobs (graph_conv_tc.cu): other tile sizes and phase-2 warp
# tiles must give the same results, so that a faster setting found on a GPU can ship.
@pytest.mark.parametrize("knobs", [
    dict(AFFECTKIT_GRAPH_TC_TILE_KB="1", AFFECTKIT_GRAPH_TC_AZ_MR="1"),
    dict(AFFECTKIT_GRAPH_TC_TILE_KB="64"),
    dict(AFFECTKIT_GRAPH_TC_TILE_KB="4", AFFECTKIT_GRAPH_TC_AZ_MR="1")],
                         ids=lambda k: ",".join(f"{n.removeprefix('AFFECTKIT_GRAPH_TC_').lower()}={v}" for n, v in k.items()))
def test_tensor_core_knobs_match_float64(knobs, gen):
    seed = int(torch.randint(2**31, (1,), generator=gen))
    proc = _run("tc", SCRIPT, str(seed), str(TOL), **knobs)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout}\n{proc.stderr[-3000:]}"


# The call below has N = 14 (one m16 tile), where AZ_MR does not matter: it must raise anyway.
@pytest.mark.parametrize("knob, value", [("AFFECTKIT_GRAPH_TC_TILE_KB", "0"), ("AFFECTKIT_GRAPH_TC_AZ_MR", "two"),
                                        ("AFFECTKIT_GRAPH_TC_AZ_MR", "3")])
def test_bad_knob_raises_value_error(knob, value):
    proc = _run("tc", CALL_PRINTING_VALUE_ERROR, **{knob: value})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and knob in proc.stdout, proc.stdout


# The warp kernel's prefetching variant (graph_conv_cuda.cu, kPrefetch): 1 keeps about one
# sample a warp, 3 gives each warp several (the sweep's S = 8195), so the next sample's x is
# loaded while a sample is multiplied. Same float64 sweep, forced onto the warp kernel.
@pytest.mark.parametrize("spw", ["1", "3"])
def test_warp_prefetch_matches_float64(gen, spw):
    seed = int(torch.randint(2**31, (1,), generator=gen))
    proc = _run("warp", SCRIPT, str(seed), str(TOL), AFFECTKIT_GRAPH_WARP_SPW=spw)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("value", ["17", "one"])
def test_bad_warp_spw_raises_value_error(value):
    # 14 x 5 -> 32 is a warp kernel call (the other call's 14 x 32 -> 32 is too large for it).
    call = CALL_PRINTING_VALUE_ERROR.replace("(4, 14, 32,", "(4, 14, 5,").replace("torch.ones(32, 32,", "torch.ones(5, 32,")
    assert "(4, 14, 5," in call and "torch.ones(5, 32," in call
    proc = _run("warp", call, AFFECTKIT_GRAPH_WARP_SPW=value)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and "AFFECTKIT_GRAPH_WARP_SPW" in proc.stdout, proc.stdout


# The wg kernel's W^T-in-registers setting (graph_conv_wg_sm90a.cu, kWRegs: 2 warpgroups, phase 1
# with its left operand from registers). Same float64 sweep as the forced paths above.
def test_wg_w_in_registers_matches_float64(gen):
    if not _wgmma_possible():
        pytest.skip("the wg kernel runs on compute capability 9.0 with an sm_90a build only")
    seed = int(torch.randint(2**31, (1,), generator=gen))
    proc = _run("wg", SCRIPT, str(seed), str(TOL), AFFECTKIT_GRAPH_WG_WREGS="1")
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout}\n{proc.stderr[-3000:]}"


def test_bad_wg_wregs_raises_value_error():
    if not _wgmma_possible():
        pytest.skip("the setting is read where the wg kernel runs (compute capability 9.0, sm_90a build)")
    proc = _run("wg", CALL_PRINTING_VALUE_ERROR, AFFECTKIT_GRAPH_WG_WREGS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and "AFFECTKIT_GRAPH_WG_WREGS" in proc.stdout, proc.stdout


def test_unknown_path_raises_value_error():
    proc = _run("bogus", CALL_PRINTING_VALUE_ERROR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and "AFFECTKIT_GRAPH_CUDA_PATH" in proc.stdout, proc.stdout
