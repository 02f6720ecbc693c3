"""Checkpoints as complete Hugging Face models, checked with transformers' own APIs, offline."""

import json
import math
import os
import shutil

import pytest
import tokenizers
import torch
import transformers
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from tinygemma.cli import main
from tinygemma.config import UserError
from tinygemma.export import ExportConfig, export
from tinygemma.hf_folder import HF_FILES, sampling_defaults, write_hf_files
from tinygemma.model import PRESETS, Gemma3, ModelConfig

assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: nothing here may touch the Hub
TRAINER_FILES = ("optimizer.pt", "trainer_state.json", "rng_state.pt", "run_config.json")
INFO = {"step": 1200, "tokens_seen": 9_830_400, "val_loss": 1.7321, "val_tokens": 163_840,
        "recipe": "tiny-cpu (AdamW 1e-3, cosine)", "hardware": "2 CPU cores", "training_time_s": 4000.0,
        "samples": ["Once upon a time, there was a cat.\n\nThe cat was happy.", "Tom had a red ball."],
        "train_config": {"lr": 1e-3, "batch_size": 32}}


def randomised(seed: int = 0) -> Gemma3:
    """Norm weights are zero at init (scale 1 + w); random ones make the logits depend on them too."""
    torch.manual_seed(seed)
    model = Gemma3(ModelConfig(**PRESETS["tiny"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Gemma3:
    return randomised()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    """A checkpoint as training writes it: HF files plus trainer state."""
    folder = model.save_pretrained(tmp_path_factory.mktemp("run") / "checkpoint-1200")
    for name in TRAINER_FILES:
        (folder / name).write_text("{}")
    write_hf_files(folder, INFO)
    return folder


def ids_batch(n: int = 2, t: int = 40) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(1))


# -- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_matches_tiktoken_on_every_sample_story(ckpt, sample_stories, tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    stories = sample_stories["train"] + sample_stories["val"]
    assert len(stories) == 7381
    ours = tokenizer.encode_batch(stories, num_threads=2)
    theirs = tok(stories)["input_ids"]
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not bad, f"{len(bad)} stories differ, first #{bad[0]}"
    assert tok.batch_decode(theirs) == stories


def test_tokenizer_edge_cases_and_special_tokens(ckpt, tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    texts = ["", " ", "  leading", "trailing  \n", "a\r\nb\n\n\n c", "tabs\t\there", "It's, I'll, WE'RE, you'D",
             "numbers 1234567 3.14159 -42", "café naïve 😀 日本語 \u00a0nbsp", "x" * 300, "<|endoftext|"]
    assert [tok.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
    assert [tok.decode(tokenizer.encode(t)) for t in texts] == texts
    raw = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))  # tools that skip transformers
    assert [e.ids for e in raw.encode_batch(texts)] == [tokenizer.encode(t) for t in texts]
    assert len(tok) == 50257 and tok.model_max_length == 512  # the tiny preset's context
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tok, name) == 50256, name
    assert tok("Hi")["input_ids"] == tokenizer.encode("Hi")  # no bos added, as in training
    assert tok.encode("The end.<|endoftext|>")[-1] == 50256  # the special token is one id


# -- model, pipeline, generation ------------------------------------------------------------------
def test_automodel_logits_match(ckpt, model):
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert isinstance(hf, transformers.Gemma3ForCausalLM) and hf.dtype == torch.float32
    ids = ids_batch()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_generation_config(ckpt):
    gen = transformers.GenerationConfig.from_pretrained(ckpt)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (50256, 50256, 50256)
    assert gen.do_sample is True
    # transformers samples like `tinygemma generate` does by default
    assert {k: getattr(gen, k) for k in sampling_defaults()} == {
        "max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def test_pipeline_generates_text(ckpt):
    pipe = transformers.pipeline("text-generation", model=str(ckpt), device="cpu")
    torch.manual_seed(0)
    out = pipe("Once upon a time", max_new_tokens=8)[0]["generated_text"]
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time")


def test_greedy_generate_matches_plain_loop(ckpt, model):
    """transformers' cached greedy decoding vs. argmax over a full forward pass per token."""
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    prompt = tok("Once upon a time, there was", return_tensors="pt").input_ids
    n = 24  # > the tiny preset's 16-token window, so decoding crosses it
    out = hf.generate(prompt, do_sample=False, max_new_tokens=n)[0, prompt.shape[1]:].tolist()
    ids = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == 50256:
                break
    assert out == ids[prompt.shape[1]:]


# -- model card -----------------------------------------------------------------------------------
def test_model_card_with_info(ckpt, model):
    card = ModelCard.load(ckpt / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation" and data["datasets"] == ["roneneldan/TinyStories"]
    text = card.text
    total = model.config.param_breakdown()["total"]
    assert total == model.num_params() and f"{total:,}" in text
    for want in ("CDLA-Sharing-1.0", "9,830,400", "tiny-cpu (AdamW 1e-3, cosine)", "2 CPU cores", "1,200",
                 "1.7321", f"{math.exp(1.7321):.2f}", "163,840", "1 h 6 min", "> The cat was happy.",
                 "Tom had a red ball.", '"batch_size": 32', "AutoModelForCausalLM.from_pretrained",
                 "arXiv:2503.19786", "arXiv:2305.07759", "Gemma 3 Technical Report", "Eldan",
                 f"# {ckpt.parent.name}/checkpoint-1200\n"):
        assert want in text, want


def test_model_card_without_info(tmp_path):
    write_hf_files(randomised().save_pretrained(tmp_path / "story-model"))
    text = (tmp_path / "story-model" / "README.md").read_text()
    assert text.startswith("---\nlicense: apache-2.0\n") and "\n# story-model\n" in text
    assert "Not evaluated yet" in text and "None recorded" in text and "Tokens seen" not in text
    assert "None" not in text.replace("None recorded", "") and "{" not in text.split("```bibtex")[0]


def test_model_card_of_a_finetuned_checkpoint(tmp_path):
    """A `finetune` checkpoint's card shows the instruct prompt it takes, and does not say it cannot follow them."""
    folder = randomised().save_pretrained(tmp_path / "plain")
    write_hf_files(folder)
    assert "cannot follow instructions" in (folder / "README.md").read_text()
    folder = randomised().save_pretrained(tmp_path / "instruct")
    write_hf_files(folder, {"recipe": "finetune", "train_config": {"finetune_from": "runs/base/best", "lr": 1e-4}})
    text = (folder / "README.md").read_text()
    assert r"`'Features: Dialogue\nWords: frog, jump, shiny\nStory: \n\n'`" in text
    assert "cannot follow instructions" not in text and "tinygemma eval --instruct" in text


def test_write_hf_files_refuses_bad_info_and_non_model(tmp_path, ckpt):
    with pytest.raises(UserError, match="unknown key 'val_los'.*did you mean 'val_loss'"):
        write_hf_files(ckpt, {"val_los": 1.0})
    with pytest.raises(UserError, match="expected int"):
        write_hf_files(ckpt, {"step": "ten"})
    with pytest.raises(UserError, match="no config.json"):
        write_hf_files(tmp_path)


# -- export ---------------------------------------------------------------------------------------
def test_export_fp32_is_clean_and_loads(ckpt, model, tmp_path, capsys):
    out = tmp_path / "shared"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES)  # no optimizer/trainer/temp files
    assert not list(tmp_path.glob(".*"))
    assert (out / "README.md").read_text() == (ckpt / "README.md").read_text()  # the run's card travels
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_text() == (ckpt / name).read_text()
    src, dst = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert transformers.AutoTokenizer.from_pretrained(out).encode("Once") == [7454]
    with torch.no_grad():
        assert (hf(ids_batch()).logits - model(ids_batch())).abs().max().item() < 1e-4


def test_export_run_folder_bf16(ckpt, model, tmp_path):
    shutil.copytree(ckpt, tmp_path / "run" / "best")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), str(out), "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not any((out / name).exists() for name in TRAINER_FILES)
    # The export holds exactly the fp32 weights rounded to bf16 (round-to-nearest-even, like torch).
    src, dst = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(dst[k].dtype == torch.bfloat16 and torch.equal(dst[k], src[k].to(torch.bfloat16)) for k in src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.bfloat16  # transformers keeps the stored dtype
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == 50256
    # Logits, computed in fp32 from the bf16 weights, against the fp32 model. bf16 keeps 8 significant
    # bits, so each weight moves by a relative rounding error of RMS about 2^-9/sqrt(3); errors from the
    # n rounded tensors on the path (the tied embedding counts twice: input and output) add in
    # quadrature, so the relative RMS logit error should be about sqrt(n) * 2^-9/sqrt(3): 0.73% here. The
    # random (1 + w) norm scales amplify it a little: 0.86-1.05% measured over six seeds. We allow twice
    # the estimate (1.46%).
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_batch(4, 64)
    with torch.no_grad():
        ref, got = model(ids), hf32(ids).logits
    n = len(src) + 1
    rel_rms = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < rel_rms < 2 * math.sqrt(n) * 2**-9 / math.sqrt(3), rel_rms
    with torch.no_grad():  # and transformers' bf16 model computes what ours does with rounded weights
        rounded = randomised().to(torch.bfloat16).float()
        assert (rounded(ids) - got).abs().max().item() < 1e-4
    # Exporting the export keeps bf16 by default, bit for bit (bf16 -> fp32 -> bf16 is exact).
    export(ExportConfig(source=str(out), out=str(tmp_path / "again")))
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], dst[k]) for k in dst)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tinygemma export: error: "), err
    return err


def test_export_refuses_bad_input(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty (use --force" in one_line_error(capsys, ["export", str(ckpt), str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    assert "not a folder" in one_line_error(capsys, ["export", str(ckpt), str(tmp_path / "afile")])
    assert "no such checkpoint" in one_line_error(capsys, ["export", str(tmp_path / "missing"), str(tmp_path / "o")])
    (tmp_path / "half").mkdir()
    shutil.copy(ckpt / "config.json", tmp_path / "half")
    assert "not a checkpoint" in one_line_error(capsys, ["export", str(tmp_path / "half"), str(tmp_path / "o")])
    (tmp_path / "corrupt").mkdir()
    shutil.copy(ckpt / "config.json", tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\0" * 100)
    assert "corrupt" in one_line_error(capsys, ["export", str(tmp_path / "corrupt"), str(tmp_path / "o")])
    fp16 = ["export", str(ckpt), str(tmp_path / "o"), "--dtype", "fp16"]
    assert "choose bf16 or fp32" in one_line_error(capsys, fp16)
    # --force would delete the source if OUT were the checkpoint or its run folder
    assert "overlaps" in one_line_error(capsys, ["export", str(ckpt), str(ckpt.parent), "--force"])
    assert (ckpt / "model.safetensors").exists()
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_export_force_replaces_and_failure_keeps_old(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    monkeypatch.setattr("tinygemma.export.write_hf_files", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        export(ExportConfig(source=str(ckpt), out=str(out), force=True))
    assert [p.name for p in out.iterdir()] == ["stale.bin"] and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    assert main(["export", str(ckpt), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES)
    assert not list(tmp_path.glob(".out.*"))


def test_export_empty_existing_folder_is_fine(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    export(ExportConfig(source=str(ckpt), out=str(tmp_path / "empty")))
    assert (tmp_path / "empty" / "tokenizer.json").is_file()
