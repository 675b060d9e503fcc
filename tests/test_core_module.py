"""The compiled module itself: imports without torch, reports its build, links no libtorch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from affectkit import _C


def test_imports_without_torch():
    # Block torch entirely: the core and `affectkit info` must still work.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import affectkit, affectkit._C as C, json\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(json.dumps(C.build_info()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == _C.__version__


def test_torch_is_loaded_before_the_core():
    # Loading torch after affectkit._C crashed torch's import on the H100 machine (see
    # affectkit/__init__.py); `import affectkit` must load torch first where it is installed.
    pytest.importorskip("torch")
    code = (
        "import sys, affectkit\n"
        "names = list(sys.modules)\n"
        "print(names.index('torch') < names.index('affectkit._C'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_build_info_is_consistent():
    info = _C.build_info()
    from importlib.metadata import version

    assert info["version"] == version("affectkit")  # CMake's project version is the one source
    archs = info["cuda_architectures"]
    if info["cuda_compiled"]:
        # sm_80 and sm_90 machine code plus compute_90 PTX by default.
        assert archs, "CUDA compiled but no architectures recorded"
        assert info["cuda_runtime_version"] >= 11000
    else:
        assert archs == "" and info["cuda_runtime_version"] == 0
    assert _C.cpu_simd_level() in {"avx512", "avx2", "sse4.2", "neon", "scalar"}
    assert _C.num_threads() >= 1
    assert _C.cuda_device_count() >= 0


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not available on this system")
def test_no_libtorch_dependency():
    out = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libc." in out  # ldd really read the module
    for lib in ("libtorch", "libc10", "libcudart.so"):
        assert lib not in out, f"affectkit._C must not link {lib}:\n{out}"


def _arrays(B, L, F, dtype=np.float32):
    x = np.random.default_rng().standard_normal((B, L, F)).astype(dtype)
    lengths = np.full(B, L, dtype=np.int64)
    out = np.full((B, F), np.nan, dtype=dtype)
    return x, lengths, out


def test_raw_pointer_call_with_numpy():
    # The core works on any memory: numpy arrays here, poisoned output.
    x, lengths, out = _arrays(5, 11, 3, np.float64)
    lengths[:] = [0, 1, 5, 11, 7]
    _C.masked_mean_forward(_C.DEVICE_CPU, _C.DTYPE_CODES["float64"], x.ctypes.data, lengths.ctypes.data,
                           out.ctypes.data, 5, 11, 3)
    want = np.stack([x[b, : max(n, 1)].mean(0) * (n > 0) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dtype": 4}, TypeError, r"x: expected dtype float32 or float64, got int32"),
        ({"dtype": 99}, ValueError, r"dtype: expected a dtype code"),
        ({"device": 7}, ValueError, r"device: expected a device code"),
        ({"B": -1}, ValueError, r"B: expected a size >= 0, got -1"),
        ({"x": 0}, ValueError, r"x: expected a valid data pointer"),
        ({"lengths_value": 12}, ValueError, r"lengths: expected values in \[0, 11\], got lengths\[0\] = 12"),
        ({"lengths_value": -1}, ValueError, r"got lengths\[0\] = -1"),
    ],
)
def test_boundary_validation(kwargs, exc, match):
    x, lengths, out = _arrays(2, 11, 3)
    lengths[0] = kwargs.pop("lengths_value", 4)
    call = dict(device=_C.DEVICE_CPU, dtype=_C.DTYPE_CODES["float32"], x=x.ctypes.data,
                lengths=lengths.ctypes.data, out=out.ctypes.data, B=2, L=11, F=3)
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        _C.masked_mean_forward(**call)
    assert np.isnan(out).all(), "a rejected call must not write its output"


def test_cuda_request_without_gpu_raises_cleanly():
    if _C.cuda_device_count() > 0:
        pytest.skip("a GPU is visible: the no-GPU error path cannot be exercised here")
    x, lengths, out = _arrays(2, 3, 4)
    expected = RuntimeError if _C.build_info()["cuda_compiled"] else ValueError
    with pytest.raises(expected, match="masked_mean_forward"):
        _C.masked_mean_forward(_C.DEVICE_CUDA, _C.DTYPE_CODES["float32"], x.ctypes.data, lengths.ctypes.data,
                               out.ctypes.data, 2, 3, 4)


def test_set_num_threads_validates():
    before = _C.num_threads()
    with pytest.raises(ValueError, match="n: expected a thread count >= 1, got 0"):
        _C.set_num_threads(0)
    _C.set_num_threads(1)
    assert _C.num_threads() == 1
    _C.set_num_threads(before)
