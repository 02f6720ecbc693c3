import hashlib
import os

import pytest
import tiktoken

from tinygemma import tokenizer as tok
from tinygemma.config import UserError


def test_known_encoding(tokenizer):
    assert tokenizer.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert tokenizer.eot_id == 50256 and tokenizer.enc.n_vocab == 50257
    assert tokenizer.encode("<|endoftext|>") != [50256]  # story text never yields the special token


def test_roundtrip_on_sample(tokenizer, sample_stories):
    stories = sample_stories["train"] + sample_stories["val"]
    assert len(stories) == 6581 + 800
    for story, ids in zip(stories, tokenizer.encode_batch(stories, num_threads=2), strict=True):
        assert tokenizer.decode(ids) == story


def test_matches_tiktokens_own_encoding(tokenizer, sample_stories, monkeypatch, tmp_path):
    """Without the env var, tiktoken's own r50k_base loader runs (its download served from a
    pre-filled cache, as after a first online run) and must agree with the offline encoding."""
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(open(os.environ[tok.ENV_BPE], "rb").read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(tok.ENV_BPE)
    tok.get_encoding.cache_clear()
    try:
        online = tok.Tokenizer()
        assert online.enc.name == "r50k_base"
        for story in sample_stories["val"]:
            assert tokenizer.encode(story) == online.encode(story)
    finally:
        tok.get_encoding.cache_clear()


def test_wrong_hash(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(UserError, match="is not GPT-2's BPE ranks"):
        tok.get_encoding(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        tok.get_encoding(str(tmp_path / "missing.tiktoken"))


def test_offline_without_file(monkeypatch):
    monkeypatch.delenv(tok.ENV_BPE, raising=False)
    tok.get_encoding.cache_clear()

    def no_network(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(UserError, match="set TINYGEMMA_GPT2_BPE"):
        tok.get_encoding()
    tok.get_encoding.cache_clear()


def test_pickles_for_worker_processes(tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("Hello world") == tokenizer.encode("Hello world")
