"""scripts/ncu_hot_lines.py, which gpu_check.sh's ncusrc step runs on ncu's source page: it must
rank instructions by stall samples and name their leading reasons, or say it found no table."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ncu_hot_lines.py"

PAGE = """==PROF== Connected to process 1
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_barrier","stall_long_sb"
"0x100","FMNMX R1, R2, R3, !PT","30","20","0","0"
"0x110","BAR.SYNC.DEFER_BLOCKING 0x1, 0x100","1,200","1,100","1,150","0"
"0x120","LDG.E R4, desc[UR4][R2.64]","400","390","0","380"
"""


def _run(tmp_path, text, *args):
    path = tmp_path / "page.csv"
    path.write_text(text)
    return subprocess.run([sys.executable, str(SCRIPT), str(path), *args], capture_output=True, text=True)


def test_ranks_by_samples_with_reasons(tmp_path):
    proc = _run(tmp_path, PAGE, "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "3 instructions, 1630 samples" in lines[0]
    assert len(lines) == 3  # the summary and the top 2
    assert "BAR.SYNC" in lines[1] and lines[1].lstrip().startswith("73.6%") and "stall_barrier 1150" in lines[1]
    assert "LDG.E" in lines[2] and "stall_long_sb 380" in lines[2]


def test_says_when_there_is_no_table(tmp_path):
    proc = _run(tmp_path, "==ERROR== unrecognised option '--print-source'\n")
    assert proc.returncode == 1
    assert "no source table" in proc.stdout
