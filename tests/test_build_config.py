"""The CMake switches: CUDA forced off, and nvcc found off PATH through CUDA_HOME."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")


def configure(tmp_path, env_extra, path=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AFFECTKIT_", "CUDA"))}
    env.update(env_extra)
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "b"), "-G", "Ninja",
         f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"],
        capture_output=True, text=True, env=env,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(CMAKE is None, reason="cmake not found")
def test_cuda_can_be_forced_off(tmp_path):
    rc, log = configure(tmp_path, {"AFFECTKIT_CUDA": "OFF"})
    assert rc == 0, log
    assert "affectkit: CUDA disabled (AFFECTKIT_CUDA=OFF)" in log
    header = (tmp_path / "b" / "generated" / "build_config.h").read_text()
    assert '#define AFFECTKIT_CUDA_ARCHS_STR ""' in header


@pytest.mark.skipif(CMAKE is None or not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="needs cmake and a CUDA toolkit in /usr/local/cuda")
def test_nvcc_found_through_cuda_home_when_not_on_path(tmp_path):
    # PATH without any nvcc: the toolkit must be found from CUDA_HOME.
    path = "/usr/bin:/bin"
    assert shutil.which("nvcc", path=path) is None
    rc, log = configure(tmp_path, {"AFFECTKIT_CUDA": "ON", "CUDA_HOME": "/usr/local/cuda",
                                   "AFFECTKIT_CUDA_ARCHS": "80-real;90"}, path=path)
    assert rc == 0, log
    assert "affectkit: CUDA" in log and "architectures 80-real;90" in log
    header = (tmp_path / "b" / "generated" / "build_config.h").read_text()
    # With sm_90 in the list, the Hopper-only (wgmma) files are built for sm_90a as well.
    assert '#define AFFECTKIT_CUDA_ARCHS_STR "80-real;90;90a-real"' in header


@pytest.mark.skipif(CMAKE is None or not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="needs cmake and a CUDA toolkit in /usr/local/cuda")
def test_no_sm90a_code_without_sm90(tmp_path):
    rc, log = configure(tmp_path, {"AFFECTKIT_CUDA": "ON", "CUDA_HOME": "/usr/local/cuda",
                                   "AFFECTKIT_CUDA_ARCHS": "80-real"})
    assert rc == 0, log
    header = (tmp_path / "b" / "generated" / "build_config.h").read_text()
    assert '#define AFFECTKIT_CUDA_ARCHS_STR "80-real"' in header
    assert "_sm90a.cu" not in (tmp_path / "b" / "build.ninja").read_text()
