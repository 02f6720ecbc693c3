"""notebooks/inference.ipynb: executed headless on the tests' short run, and the outputs committed with it."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tinygemma.prompts import TUTORIAL_PROMPTS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "inference.ipynb"
# an absolute path of the machine that ran the notebook (a relative "../tmp/..." is fine)
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:work|root|tmp|home|Users|usr|opt|var|private)/|site-packages")


def outputs(nb: nbformat.NotebookNode, section: str) -> list[dict]:
    """The outputs of the code cells under the markdown heading that starts with ``section``."""
    found, inside = [], False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            inside = cell.source.startswith(section)
        elif inside:
            found += cell.outputs
    assert found, f"no outputs under {section!r}"
    return found


def text(outs: list[dict], name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in outs if o.get("name") == name)


def check_outputs(nb: nbformat.NotebookNode) -> None:
    """No errors, no absolute paths; the stories, the plots and transformers' equal greedy text are there."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
            assert out.get("name") != "stderr", out.get("text")  # no warnings or progress bars
            shown = str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
            assert not ABSOLUTE.search(shown), shown
    stories = text(outputs(nb, "## 3."))
    assert all(prompt in stories for prompt in TUTORIAL_PROMPTS)
    assert len(stories) > sum(map(len, TUTORIAL_PROMPTS)) + 100  # and the model's continuations
    table = outputs(nb, "## 4.")[0]["data"]
    assert "<table" in table["text/html"] and "distinct_2" in table["text/plain"]
    for section, figures in (("## 5.", 1), ("## 6.", 2)):  # next-token bars; loss and learning rate
        assert sum("image/png" in o.get("data", {}) for o in outputs(nb, section)) == figures
    assert re.search(r"validation: loss \d+\.\d+ nats/token, perplexity", text(outputs(nb, "## 7.")))
    hf = text(outputs(nb, "## 8."))
    assert "Gemma3ForCausalLM: " + TUTORIAL_PROMPTS[1] in hf and "same greedy text as tinygemma: True" in hf


def test_committed_notebook_shows_the_demo_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    assert "checkpoint: ../runs/demo/best" in text(outputs(nb, "## 1."))
    check_outputs(nb)


@pytest.mark.slow
def test_notebook_executes_on_a_checkpoint(short_run, data_dir, tmp_path):
    before = NOTEBOOK.read_bytes()
    out = tmp_path / "executed.ipynb"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "notebook.py"), str(NOTEBOOK), "--set",
                           f"RUN={short_run}", "--set", f"DATA={data_dir}", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)  # a hang guard: busy machines are slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NOTEBOOK.read_bytes() == before  # the committed outputs are left alone
    nb = nbformat.read(out, as_version=4)
    assert f"{short_run.name}/best" in text(outputs(nb, "## 1."))
    check_outputs(nb)


def test_notebook_script_refuses_an_unknown_parameter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "notebook.py"), str(NOTEBOOK), "--set",
                           "MODEL=x", "--out", str(tmp_path / "x.ipynb")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "notebook: error: the parameters cell assigns no MODEL"
    assert not (tmp_path / "x.ipynb").exists()
