import json
import subprocess
import sys

import affectkit


def _run(*args):
    return subprocess.run([sys.executable, "-m", "affectkit", *args], capture_output=True, text=True)


def test_info_json_matches_api():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["version"] == affectkit.__version__
    assert data == {**affectkit.info(), "openmp_threads": data["openmp_threads"]}
    for key in ("cuda_compiled", "cuda_architectures", "gpu_usable", "openmp_threads", "simd", "simd_kernels", "torch"):
        assert key in data


def test_selfcheck_passes_and_reports_every_op():
    proc = _run("selfcheck", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    from affectkit.selfcheck import CHECKS

    assert {r["op"] for r in rows} == set(CHECKS)
    assert all(r["ok"] and r["rel_error"] <= r["tolerance"] for r in rows)


def test_unknown_command_fails():
    proc = _run("no-such-command")
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr
