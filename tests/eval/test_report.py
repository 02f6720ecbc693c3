"""``tinygemma report`` over two real CPU runs of the demo's size (tiny preset), opened in headless Chromium."""

import json
import shutil

import pytest

import tinygemma.eval.report as report_mod
from tinygemma.cli import main
from tinygemma.eval.loss import EvalConfig, evaluate_checkpoint


@pytest.fixture(scope="module")
def eval_data(prepared_sample):
    """20 stories per split: the whole-split evaluation stays quick."""
    return prepared_sample(20)


@pytest.fixture(scope="module")
def two_runs(short_run, data_dir, sample_dir, tmp_path_factory):
    """The shared 20-step run (copied: the report writes its cache into run folders) and a 12-step run with
    another seed and learning rate, plus optional files: instruct rates and a judge summary."""
    root = tmp_path_factory.mktemp("runs")
    first = root / "lr1e-2"
    shutil.copytree(short_run, first)
    second = root / "lr3e-3"
    assert main(["train", "--data", str(data_dir), "--out", str(second), "--model", "tiny", "--block-size", "32",
                 "--micro-batch", "8", "--grad-accum", "1", "--lr", "3e-3", "--seed", "7", "--eval-batches", "2",
                 "--log-interval", "1", "--no-progress", "--max-steps", "12", "--eval-interval", "6"]) == 0
    # instruct rates as `eval --instruct` writes them (second), and a file of another format (first)
    derived = root / "derived"
    assert main(["prepare", "--derive-instructions", "--source", str(sample_dir), "--out", str(derived),
                 "--max-stories", "20"]) == 0
    assert main(["eval", str(second), "--instruct", str(derived), "--records", "4", "--instruct-max-new-tokens",
                 "16", "--report", str(second / "instruct_eval.json")]) == 0
    (first / "instruct_eval.json").write_text(json.dumps({"follows_instruction": 0.25}))
    (second / "judge").mkdir()
    (second / "judge" / "judge_summary.json").write_text(json.dumps({
        "judge_model": "fake-judge", "graded": 4, "failures": 1,
        "criteria": {c: {"mean": 6.5, "ci95": [5.25, 7.75], "n": 4} for c in ("grammar", "creativity",
                                                                                  "consistency", "plot")},
        "age_groups": {"A": 0, "B": 3, "C": 1, "D": 0, "E": 0, "F": 0}}))
    return first, second


@pytest.mark.slow
def test_report_over_two_runs(two_runs, eval_data, tmp_path, browser, capsys, monkeypatch):
    first, second = two_runs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run_config.json").write_text((first / "run_config.json").read_text())
    out = tmp_path / "report"
    args = ["report", str(first), str(second), str(broken), str(tmp_path / "missing"), "--out", str(out),
            "--data", str(eval_data), "--context-stories", "10", "--max-new-tokens", "24"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "broken: no checkpoint" in printed and "missing: " in printed and "no such run folder" in printed
    assert "lr1e-2: instruct_eval.json: not a result of `tinygemma eval --instruct`" in printed
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()

    # instruct rates: the numbers eval --instruct wrote, in the run's row
    res = json.loads((second / "instruct_eval.json").read_text())
    words = res["constraints"]["words"]
    instructed = [f"{words['rate']:.1%} \\[{words['ci95'][0]:.2f}, {words['ci95'][1]:.2f}\\]",
                  f"{res['story_loss']:,.4f}", "each word"]
    assert "follows" not in md

    # the whole-split numbers are eval's own, for each run's best checkpoint
    expected = evaluate_checkpoint(first, EvalConfig(data=str(eval_data), context_stories=10))
    for text in (f"{expected['loss']:,.4f}", f"{expected['bits_per_byte']:,.4f}",
                 f"{expected['context_use']['gap']:,.4f}", "lr1e-2", "lr3e-3", *instructed,
                 "6.50 \\[5.25, 7.75\\]", "fake-judge", "(loss.png)", "(lr_grad_norm.png)", "Flesch-Kincaid grade"):
        assert text in md, text
    assert md.count("**lr1e-2**") == 5 == md.count("**lr3e-3**")  # the five prompts side by side

    # cached: a second report computes nothing and writes the same page
    def fail(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(report_mod, "evaluate_checkpoint", fail)
    monkeypatch.setattr(report_mod, "sample_report", fail)
    assert main(args) == 0
    assert (out / "report.md").read_text() == md and (out / "report.html").read_text() == page
    assert main([*args[:3], "--out", str(tmp_path / "r2"), "--no-compute", "--data", str(eval_data),
                 "--context-stories", "11"]) == 0
    assert "eval: not computed yet (--no-compute)" in capsys.readouterr().out

    # the page in a real browser: it renders, the plots load, no console errors
    browser.get((out / "report.html").as_uri())
    assert browser.find_element("tag name", "h1").text.startswith("tinygemma report")
    sizes = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == 2 and all(done and width > 0 for done, width in sizes), sizes
    assert len(browser.find_elements("tag name", "table")) >= 6
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


@pytest.mark.slow
def test_report_reuses_the_runs_eval(short_run, eval_data, tmp_path, capsys):
    """`tinygemma eval RUN` (fp32) keeps its result where `report` looks, so `make demo` scores the split once:
    a `--no-compute` report with the same settings shows eval's figures; a bf16 eval is not kept."""
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    flags = ["--data", str(eval_data) + "/", "--context-stories", "5"]  # the report reads the path normalised
    assert main(["eval", str(run), *flags, "--dtype", "bf16"]) == 0
    assert not (run / "report_cache.json").exists()
    capsys.readouterr()
    assert main(["eval", str(run), *flags, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--no-compute", *flags]) == 0
    printed = capsys.readouterr().out
    assert "eval: not computed yet" not in printed and "samples: not computed yet" in printed
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"{expected['loss']:,.4f}" in md and f"{expected['context_use']['gap']:,.4f}" in md


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err
