"""A trained checkpoint is a complete Hugging Face model: transformers' own APIs load it offline and
greedy decoding in transformers equals `tinygemma generate --greedy`, token for token."""

import json

import pytest
import torch
import transformers

from tinygemma.cli import main

PROMPTS = ["Once upon a time", "A little girl went to the woods and found a big red ball under a tree"]


@pytest.fixture(scope="module")
def eval_data(prepared_sample):
    """10 stories per split: an evaluation of the whole split stays quick."""
    return prepared_sample(10)


@pytest.mark.slow  # the CLI-trained run's outputs: `tinygemma train --samples` end to end
def test_checkpoint_folder_is_a_complete_hf_model(short_run):
    best = short_run / "best"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "optimizer.pt", "trainer_state.json"):
        assert (best / name).is_file(), name
    state = json.loads((best / "trainer_state.json").read_text())
    card = (best / "README.md").read_text()
    assert f"{state['best_val_loss']:.4f}" in card  # the card reports the checkpoint's validation loss
    assert "Once upon a time there was a pumpkin." in card  # and stories from the latest samples report
    assert (short_run / "samples.md").is_file() and (short_run / "samples.html").is_file()
    assert "samples at step 20" in (short_run / "samples.md").read_text()


def test_transformers_greedy_generate_equals_tinygemma_generate(tiny_run, capsys):
    best = tiny_run / "best"
    assert main(["generate", str(best), *sum((["--prompt", p] for p in PROMPTS), []), "--greedy",
                 "--max-new-tokens", "40", "--json"]) == 0
    ours = [s["tokens"] for s in json.loads(capsys.readouterr().out)["samples"]]
    tok = transformers.AutoTokenizer.from_pretrained(best)
    model = transformers.AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32).eval()
    for prompt, mine in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([[tok.eos_token_id] + tok(prompt).input_ids])  # stories start after <|endoftext|>
        out = model.generate(ids, do_sample=False, max_new_tokens=40)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:  # transformers keeps the EOS it stopped at; tinygemma drops it
            out = out[: out.index(tok.eos_token_id)]
        assert out == mine
    text = transformers.pipeline("text-generation", model=str(best))(PROMPTS[0], max_new_tokens=10,
                                                                      do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPTS[0]) and len(text) > len(PROMPTS[0])


def test_eval_defaults_to_the_trained_block_size(tiny_run, eval_data, capsys):
    assert main(["eval", str(tiny_run), "--data", str(eval_data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["block_size"] == 32  # tiny_run trained with block size 32
