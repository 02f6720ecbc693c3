"""notebooks/inference.ipynb: executed headless on the tests' short run, and the outputs committed with it."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tinygemma.cli import main
from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.instruct import prepare_instruct
from tinygemma.prompts import TUTORIAL_PROMPTS

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "inference.ipynb"
# an absolute path of the machine that ran the notebook (a relative "../tmp/..." is fine)
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:work|root|tmp|home|Users|usr|opt|var|private)/|site-packages")


def outputs(nb: nbformat.NotebookNode, section: str) -> list[dict]:
    """The outputs of the code cells under the markdown heading that starts with ``section``."""
    found, inside = [], False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("#"):  # a heading; plain text stays inside
            inside = cell.source.startswith(section)
        elif inside and cell.cell_type == "code":
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
    instruct = text(outputs(nb, "## 9."))  # three asked-for stories, each checked; the measured rates
    assert "Features: Dialogue\nWords: frog, jump, shiny\nStory: \n\n" in instruct
    assert "Words: ball, rain, brave\nRandom sentence: The sun came out again.\nStory: " in instruct
    assert len(re.findall(r"^followed: words (yes|no)", instruct, re.MULTILINE)) == 3
    for measure in ("words", "sentence", "overall", "each word"):
        assert re.search(rf"^{measure} +\d+\.\d%  \[95% \d+\.\d%-\d+\.\d%\]  \(\d+/\d+\)$", instruct, re.MULTILINE)
    assert re.search(r"^story loss \d+\.\d{4} ", instruct, re.MULTILINE) and "repeated 4-grams" in instruct


def test_committed_notebook_shows_the_demo_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    assert "checkpoint: ../runs/demo/best" in text(outputs(nb, "## 1."))
    check_outputs(nb)


@pytest.fixture(scope="module")
def instruct_run(short_run, sample_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The short run fine-tuned for 4 steps on derived instruct records of 60 stories per split; (run, data)."""
    data, out = tmp_path_factory.mktemp("derived"), tmp_path_factory.mktemp("instruct-run")
    prepare_instruct(PrepareConfig(source=str(sample_dir), out=str(data), max_stories=60, workers=1),
                     InstructOptions(derive_instructions=True))
    assert main(["finetune", str(short_run), "--data", str(data), "--out", str(out), "--block-size", "96",
                 "--micro-batch", "4", "--max-steps", "4", "--eval-interval", "4", "--eval-batches", "1",
                 "--no-progress"]) == 0
    return out, data


@pytest.mark.slow
def test_notebook_executes_on_a_checkpoint(short_run, data_dir, instruct_run, tmp_path):
    before = NOTEBOOK.read_bytes()
    out = tmp_path / "executed.ipynb"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "notebook.py"), str(NOTEBOOK), "--set",
                           f"RUN={short_run}", "--set", f"DATA={data_dir}", "--set", f"INSTRUCT_RUN={instruct_run[0]}",
                           "--set", f"INSTRUCT_DATA={instruct_run[1]}", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)  # a hang guard: busy machines are slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NOTEBOOK.read_bytes() == before  # the committed outputs are left alone
    nb = nbformat.read(out, as_version=4)
    assert f"{short_run.name}/best" in text(outputs(nb, "## 1."))
    shown = text(outputs(nb, "## 9."))
    assert re.search(rf"^instruct checkpoint: \S*{instruct_run[0].name}/best$", shown, re.MULTILINE)
    check_outputs(nb)


def test_notebook_script_refuses_an_unknown_parameter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "notebook.py"), str(NOTEBOOK), "--set",
                           "MODEL=x", "--out", str(tmp_path / "x.ipynb")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "notebook: error: the parameters cell assigns no MODEL"
    assert not (tmp_path / "x.ipynb").exists()
