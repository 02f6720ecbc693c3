"""`make demo`'s script end to end, shortened: prepare, train, eval, samples report, plots, a story, the results
page."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path, sample_dir):
    tinygemma = tmp_path / "tinygemma"  # this interpreter's tinygemma, wherever the venv is
    tinygemma.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tinygemma "$@"\n')
    tinygemma.chmod(0o755)
    env = {**os.environ, "TINYGEMMA": str(tinygemma), "TINYSTORIES_DIR": str(sample_dir),
           "DEMO_DATA": str(tmp_path / "data"), "DEMO_OUT": str(tmp_path / "run"), "DEMO_TOKENS": "40960",
           "DEMO_MAX_STORIES": "200"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=1800)  # a hang guard: busy machines are slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("1/6 prepare", "2/6 train: mini preset, Muon", "3/6 eval", "4/6 samples", "5/6 generate",
                 "6/6 report"):
        assert step in proc.stdout
    assert "done: step 20, 40,960 tokens" in proc.stdout  # a fixed number of tokens, not a time budget
    assert "training took" in proc.stdout and "the demo took" in proc.stdout
    assert "val: loss" in proc.stdout and "perplexity" in proc.stdout
    val_loss = proc.stdout.split("val: loss ", 1)[1].split()[0]
    assert "Once upon a time there was a pumpkin." in proc.stdout
    run = tmp_path / "run"
    for name in ("best/model.safetensors", "best/tokenizer.json", "best/README.md", "metrics.jsonl", "loss.png",
                 "lr.png", "grad_norm.png", "samples.md", "samples.html", "report/report.md", "report/report.html"):
        assert (run / name).is_file(), name
    # the report took the whole-split figures `tinygemma eval RUN` kept (its checkpoint field names the run
    # folder; the report's own evaluation would name the checkpoint folder): the split is scored once
    cached = json.loads((run / "report_cache.json").read_text())["eval"]["result"]
    assert cached["checkpoint"] == str(run) and f"{cached['loss']:.4f}" == val_loss
    assert val_loss in (run / "report" / "report.md").read_text()
