import json
import subprocess
import sys

import pytest

from tinygemma.cli import main


def test_info_reports_270m(capsys):
    assert main(["info", "--model", "gemma3-270m"]) == 0
    out = capsys.readouterr().out
    assert "132,490,496" in out and "32,164,480" in out and "100,325,376" in out


def test_info_json_and_checkpoint(tmp_path, capsys):
    from tinygemma.model import Gemma3, load_model_config

    Gemma3(load_model_config("tiny")).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["hidden_size"] == 64
    assert info["params"]["total"] == Gemma3(load_model_config("tiny")).num_params()
    assert info["train_flops_per_token"] > 6 * info["params"]["blocks"]


def test_bad_preset_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "tinygemma", "info", "--model", "gemma9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown model 'gemma9'" in proc.stderr


def test_prepare_and_help_do_not_import_torch():
    code = ("import sys; from tinygemma.cli import build_parser\n"
            "for argv in (['prepare', '--help'], ['prepare', '--instruct', '--help'], ['train', '--help'],\n"
            "             ['finetune', '--help'], ['--help']):\n"
            "    try: build_parser(argv[0]).parse_args(argv)\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert "prepare" in proc.stdout and "serve" in proc.stdout and "--micro-batch" in proc.stdout  # help printed


def test_value_errors_of_pure_modules_are_one_line(capsys):
    assert main(["info", "--seq-len", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tinygemma info: error: --seq-len must be >= 1, got 0"


def test_a_bug_keeps_its_traceback(monkeypatch):
    # only UserError (bad input) becomes a one-line exit 2; a TypeError or a plain ValueError is a bug
    import tinygemma.model as model

    for error in (TypeError("bug"), ValueError("bug")):
        def broken(*_a, error=error, **_k):
            raise error

        monkeypatch.setattr(model, "load_model_config", broken)
        with pytest.raises(type(error), match="bug"):
            main(["info", "--model", "tiny"])
