"""Issue 12, the items outside the run folder: every bad input or state is one line (exit 2) and leaves what
exists unchanged; files follow the umask; the studio caps request bodies and says when a stream was cut."""

import json
import os
import shutil
import socket
import stat
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import one_line_error, tiny_model, tree_hash
from tinygemma import rundir
from tinygemma.cli import main
from tinygemma.data.config import PrepareConfig
from tinygemma.data.prepare import prepare
from tinygemma.data.workers import num_workers as _num_workers
from tinygemma.device import parse_device
from tinygemma.serve import app as serve
from tinygemma.serve.app import create_app, serve_in_thread

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")


@pytest.fixture
def ckpt(tiny_run, tmp_path):
    """A copy of the in-process tiny run's best/ checkpoint (tests may damage it)."""
    path = tmp_path / "best"
    shutil.copytree(tiny_run / rundir.BEST, path)
    return path


# -- 2: prepare deletes only its own temp files -------------------------------------------------------------
def test_prepare_keeps_the_users_tmp_files(sample_dir, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.tmp").write_text("mine")
    (out / "meta.json.tmp").write_text("left by a killed prepare")
    prepare(PrepareConfig(source=str(sample_dir), out=str(out), max_stories=20, workers=1))
    assert (out / "notes.tmp").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.tmp", "train.bin", "val.bin"]


# -- 6: outputs that cannot be written are refused before any work ------------------------------------------
def test_train_out_is_a_file(data_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(out), "--model", "tiny")
    assert "exists and is not a folder" in err and out.read_text() == "x"


@pytest.mark.parametrize("where", ["dir", "under_file"])
def test_samples_out_unwritable(ckpt, tmp_path, capsys, where):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    out = tmp_path / "dir" if where == "dir" else tmp_path / "file" / "report.md"
    before = tree_hash(tmp_path)
    err = one_line_error(capsys, "samples", str(ckpt), "--out", str(out), "--max-new-tokens", "4")
    assert err.startswith("tinygemma samples: error: --out") and ("is a folder" in err or "is a file" in err)
    assert tree_hash(tmp_path) == before and not list(tmp_path.glob("*.tmp"))


@as_root
def test_samples_and_export_into_read_only_folder(ckpt, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert "not writable" in one_line_error(capsys, "samples", str(ckpt), "--out", str(locked / "r.md"))
    assert "cannot write there" in one_line_error(capsys, "export", str(ckpt), str(locked / "hf"))
    assert not any(locked.iterdir())


def test_export_under_a_file(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, "export", str(ckpt), str(tmp_path / "file" / "hf"))
    assert "cannot write there" in err and (tmp_path / "file").read_text() == "x"


# -- 7: one device parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval", "samples", "serve"])
def test_unknown_device(ckpt, data_dir, capsys, command):
    extra = ["--data", str(data_dir)] if command == "eval" else []
    err = one_line_error(capsys, command, str(ckpt), "--device", "foo", *extra)
    assert "--device foo: unknown device" in err


@no_cuda
def test_cuda_without_a_gpu(ckpt, data_dir, tmp_path, capsys):
    assert "CUDA is not available" in one_line_error(capsys, "generate", str(ckpt), "--device", "cuda")
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--model", "tiny",
                         "--device", "cuda")
    assert "CUDA is not available" in err and not (tmp_path / "r").exists()


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")


# -- 8: non-finite weights are refused when the checkpoint is loaded -------------------------------------------
def test_nan_weights_refused_at_load(ckpt, capsys):
    weights = ckpt / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"][0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    before = tree_hash(ckpt)
    for argv in (["generate", str(ckpt), "--max-new-tokens", "4"], ["serve", str(ckpt), "--port", "0"]):
        err = one_line_error(capsys, *argv)
        assert "non-finite weights (NaN or inf in model.norm.weight)" in err
    assert tree_hash(ckpt) == before


# -- 9: corrupt metadata gets the same one-line errors as user input ----------------------------------------------
def test_eval_with_broken_run_config(ckpt, data_dir, capsys):
    (ckpt / rundir.RUN_CONFIG).write_text('{"train": {"block_size": "big"}, "model": {}}')
    before = tree_hash(ckpt)
    err = one_line_error(capsys, "eval", str(ckpt), "--data", str(data_dir))
    assert "not a tinygemma run config" in err and tree_hash(ckpt) == before
    (ckpt / rundir.RUN_CONFIG).write_text('{"train": ')
    assert "not valid JSON" in one_line_error(capsys, "eval", str(ckpt), "--data", str(data_dir))


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def resume_error(capsys, run_copy, data_dir, *extra: str) -> str:
    before = tree_hash(run_copy)
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(run_copy), "--resume", "auto",
                         "--no-progress", "--max-steps", "25", *extra)
    assert tree_hash(run_copy) == before
    return err


def test_resume_with_wrong_types_in_trainer_state(run_copy, data_dir, capsys):
    path = run_copy / "checkpoint-20" / rundir.TRAINER_STATE
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "tokens": "many"}))
    err = resume_error(capsys, run_copy, data_dir)
    assert "trainer_state.json.tokens: expected int, got 'many'" in err


# -- 10: sizes that cannot fit are refused with the estimate and the flag ------------------------------------
def test_training_that_cannot_fit(data_dir, tmp_path, capsys):
    err = one_line_error(capsys, "train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--model", "tiny",
                         "--micro-batch", "10000000")
    assert "GiB" in err and "lower --micro-batch" in err and not (tmp_path / "r").exists()


def test_generation_that_cannot_fit(ckpt, capsys):
    err = one_line_error(capsys, "generate", str(ckpt), "--num-samples", "10000000", "--max-new-tokens", "4")
    assert "generating 10000000 rows needs at least" in err and "lower --num-samples" in err


# -- 11: the studio caps request bodies: their size and the time to send one -------------------------------------
@pytest.fixture(scope="module")
def studio(tokenizer):
    with serve_in_thread(create_app(tiny_model(delay=0.05), tokenizer=tokenizer, model_id="tiny")) as url:
        yield url


def test_request_body_too_large(studio):
    r = httpx.post(f"{studio}/v1/completions", content=b"x" * (serve.MAX_BODY_BYTES + 1),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]
    chunked = (b'{"prompt": "' + b"x" * 65536 for _ in range(20))  # no Content-Length: counted as it comes
    r = httpx.post(f"{studio}/v1/completions", content=chunked, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413


def test_request_body_too_slow(studio, monkeypatch):
    monkeypatch.setattr(serve, "BODY_TIMEOUT_S", 0.5)
    host, port = studio.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        reply = b""
        while b"within" not in reply and (part := s.recv(65536)):  # headers and body may come apart
            reply += part
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "not received within 0.5 s" in reply


# -- 12: files follow the umask --------------------------------------------------------------------------------
def test_export_and_checkpoints_follow_the_umask(ckpt, tiny_run, tmp_path):
    mask = os.umask(0o022)
    try:
        assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o644
    current = os.umask(0)
    os.umask(current)
    mode = stat.S_IMODE((tiny_run / rundir.BEST / "model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~current


# -- 13: a stream cut by the server's shutdown says so ------------------------------------------------------------
def test_stream_cut_by_shutdown_ends_with_cancelled(tokenizer):
    events, started = [], threading.Event()
    app = create_app(tiny_model(delay=0.05), tokenizer=tokenizer, model_id="tiny")

    def read(url: str) -> None:
        body = {"prompt": "Once", "max_tokens": 400, "n": 2, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))

    with serve_in_thread(app) as url:
        reader = threading.Thread(target=read, args=(url,))
        reader.start()
        assert started.wait(30)
    reader.join(30)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])["choices"]
    assert sorted(c["index"] for c in final) == [0, 1] and {c["finish_reason"] for c in final} == {"cancelled"}
    assert len(events) < 400  # it was cut, not finished


# -- 14: smaller -----------------------------------------------------------------------------------------------
def test_workers_far_above_the_cores_are_capped(capsys):
    cores = _num_workers(0)
    assert _num_workers(cores) == cores
    assert _num_workers(1000 * cores) == 4 * cores
    assert "far above the" in capsys.readouterr().err


def test_missing_local_source_that_looks_like_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, "prepare", "--source", "nosuch/folder", "--out", str(tmp_path / "d"))
    assert "no local folder ./nosuch/folder exists" in err and not (tmp_path / "d").exists()


def test_optimizer_state_corrupt_vs_not_fitting(run_copy, data_dir, capsys):
    path = run_copy / "checkpoint-20" / "optimizer.pt"
    good = torch.load(path, weights_only=True)
    torch.save({"hello": 1}, path)
    assert "corrupt (loads, but is not an optimizer state)" in resume_error(capsys, run_copy, data_dir)
    adamw = good.get("adamw", good)  # the default recipe (Muon) saves {optimizer name: state}
    wrong = {**adamw, "param_groups": adamw["param_groups"] * 2}
    torch.save({**good, "adamw": wrong} if "adamw" in good else wrong, path)
    assert "a valid optimizer state that does not fit this model" in resume_error(capsys, run_copy, data_dir)
    path.write_bytes(b"not a zip")
    assert "unreadable or corrupt" in resume_error(capsys, run_copy, data_dir)


def test_resume_on_different_data_warns(run_copy, data_dir, sample_dir, tmp_path, capsys):
    other = tmp_path / "other"
    prepare(PrepareConfig(source=str(sample_dir), out=str(other), max_stories=200, workers=1))
    assert main(["train", "--data", str(other), "--out", str(run_copy), "--resume", "auto", "--no-progress",
                 "--max-steps", "21"]) == 0
    assert "its train split (sha256" in capsys.readouterr().err
