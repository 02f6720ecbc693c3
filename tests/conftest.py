import os
import shutil
from pathlib import Path

import pytest
import torch

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# The suite runs offline: default to the GPT-2 BPE file and the sample beside the checkout.
if (SHARED / "gpt2.tiktoken").exists():
    os.environ.setdefault("TINYGEMMA_GPT2_BPE", str(SHARED / "gpt2.tiktoken"))
if (SHARED / "tinystories").exists():
    os.environ.setdefault("TINYSTORIES_DIR", str(SHARED / "tinystories"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    path = Path(os.environ.get("TINYSTORIES_DIR", SHARED / "tinystories"))
    if not (path / "TinyStories-valid.txt").exists():
        pytest.fail(f"TinyStories sample not found at {path}; set TINYSTORIES_DIR")
    return path


@pytest.fixture(scope="session")
def sample_stories(sample_dir) -> dict[str, list[str]]:
    out = {}
    for split, name in (("train", "TinyStories-train.txt"), ("val", "TinyStories-valid.txt")):
        text = (sample_dir / name).read_text(encoding="utf-8")
        out[split] = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from tinygemma.tokenizer import Tokenizer

    return Tokenizer()


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory, sample_dir):
    """``prepared_sample(n)``: the first n stories of each split of the real sample, prepared once per session
    (read-only for the tests: share it, do not write into it)."""
    from tinygemma.data.config import PrepareConfig
    from tinygemma.data.prepare import prepare

    made: dict[int, Path] = {}

    def make(n: int) -> Path:
        if n not in made:
            made[n] = tmp_path_factory.mktemp(f"data-{n}")
            prepare(PrepareConfig(source=str(sample_dir), out=str(made[n]), max_stories=n))
        return made[n]

    return make


@pytest.fixture(scope="session")
def data_dir(prepared_sample):
    """The first 300 stories of each split of the real sample, prepared."""
    return prepared_sample(300)


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    """The unit tests' run folder, trained in-process with the library (no CLI, no samples report): the tiny
    preset (MQA, a 16-token window shorter than the test sequences, a full-attention layer), all-AdamW,
    20 steps of 1 x 32 tokens, evaluations at 10 and 20, checkpoints every 5 keeping the last 2."""
    from tinygemma.train.trainer import train

    out = tmp_path_factory.mktemp("tiny-run")
    train({"data": str(data_dir), "out": str(out), "model": "tiny", "block_size": 32, "micro_batch": 1,
           "grad_accum": 1, "lr": 1e-2, "eval_batches": 1, "log_interval": 1, "progress": False, "max_steps": 20,
           "eval_interval": 10, "save_interval": 5, "keep_last": 2}, recipe="adamw")
    return out


@pytest.fixture(scope="session")
def short_run(data_dir, tmp_path_factory):
    """A 20-step tiny-preset run through the CLI (`tinygemma train`, default recipe), with evaluations at 10
    and 20 and samples reports: for the end-to-end tests (marked slow)."""
    from tinygemma.cli import main

    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--model", "tiny", "--block-size", "32",
                 "--micro-batch", "8", "--grad-accum", "1", "--lr", "1e-2", "--eval-batches", "2",
                 "--log-interval", "1", "--no-progress", "--max-steps", "20", "--eval-interval", "10",
                 "--save-interval", "5", "--keep-last", "2", "--samples"]) == 0
    return out


@pytest.fixture()
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:  # fail, not skip: `make test` installs them (apt: chromium chromium-driver)
        pytest.fail(f"browser test needs {' and '.join(missing)} (Debian packages chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1100,760", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # an explicit driver path: selenium-manager never runs (it would try to download one)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for get_log("browser")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
