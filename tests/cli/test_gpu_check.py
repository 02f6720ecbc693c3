"""scripts/gpu_check.sh: the GPU owner's one command, run end to end on the CPU with the tiny preset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("versions", "sdpa", "parity", "prepare", "train", "resume", "fp16", "long_block", "torchrun", "generate",
         "serve", "bench")


def gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out",
                           str(tmp_path / "check"), *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.slow
def test_every_step_runs_on_the_cpu(tmp_path, sample_dir):
    proc = gpu_check(tmp_path, TINYSTORIES_DIR=str(sample_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "check" / "summary.md").read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == list(STEPS)
    results = {r[0].strip(): (r[1].strip(), r[3].strip()) for r in rows}
    assert all(status == "ok" for status, _ in results.values()), results
    assert results["resume"][1].startswith("bit-identical")  # SIGTERM + --resume auto = the uninterrupted run
    assert "flash" in results["sdpa"][1].lower() or "math" in results["sdpa"][1].lower()
    for step in STEPS:  # every step kept its output
        assert list((tmp_path / "check").glob(f"*-{step}.log")), step


def test_stops_at_the_first_failure(tmp_path):
    proc = gpu_check(tmp_path, "--only", "prepare,train", TINYSTORIES_DIR=str(tmp_path / "missing"))
    assert proc.returncode == 1
    summary = (tmp_path / "check" / "summary.md").read_text()
    assert "| prepare | FAILED |" in summary and "| train |" not in summary  # nothing runs after a failure
    assert "01-prepare.log" in summary and (tmp_path / "check" / "01-prepare.log").is_file()
