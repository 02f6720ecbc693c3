"""bench/instruct.py refuses bad flag values in one line (exit 2) before any work."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "instruct.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_instruct", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(("flags", "message"), [
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--window", "4096"], "--window 4096 exceeds the model's context length 1024"),
    (["--route", "later"], "argument --route: invalid choice: 'later'"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    (["--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["--epochs", "inf"], "--epochs must be > 0, got inf"),
    (["--finetune-steps", "0"], "--finetune-steps must be >= 1, got 0"),
    (["--finetune-steps", "3", "--epochs", "1"], "--finetune-steps and --epochs exclude each other"),
    (["--finetune-lr", "nan"], "--finetune-lr must be > 0, got nan"),
    (["--muon-lr", "-1", "--optimizer", "muon"], "--muon-lr must be > 0, got -1.0"),
    (["--muon-lr", "1e-3"], "--muon-lr needs Muon: the finetune recipe uses AdamW"),
    (["--route", "mix", "--instruct-share", "0"], "--instruct-share must be in (0, 1], got 0.0"),
    (["--instruct-share", "0.5"], "--instruct-share goes with --route mix"),
    (["--finetune-recipe", "nope"], "unknown recipe 'nope'"),
    (["--block-size", "8"], "--block-size must be >= 64, got 8"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1, got 0"),
    (["--records", "0"], "--records must be >= 1, got 0"),
    (["--pretrain-tokens", "0"], "--pretrain-tokens must be >= 1, got 0"),
    (["--base", "nowhere"], "nowhere: no such checkpoint or run folder"),
    (["--base", "nowhere", "--window", "64"], "--window sets the model to pre-train and fine-tune"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_one_line(bench, flags, message, tmp_path, capsys):
    work = tmp_path / "work"
    assert bench.main(["--workdir", str(work), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench/instruct.py: error: ") and message in err[0], err
    assert not work.exists()


def test_eval_data_must_be_instruct_records(bench, data_dir, tmp_path, capsys):
    assert bench.main(["--workdir", str(tmp_path / "work"), "--eval-data", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain token data, not instruct records" in err[0]
    assert not (tmp_path / "work").exists()
