"""The studio page in a real browser: Debian's headless Chromium driven by selenium, nothing downloaded.

The test starts its own server on a free loopback port, clicks an example prompt, watches the story
grow token by token, stops it, and saves a screenshot: into the test's temporary folder, or with
TINYGEMMA_UPDATE_SCREENSHOT=RUN_FOLDER (a trained run, e.g. runs/demo) into docs/studio.png for the
README, served from that run's model (so `make test` leaves git clean).
"""

import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tinygemma.model import Gemma3, load_model_config
from tinygemma.prompts import build_prompt
from tinygemma.serve.app import create_app, serve_in_thread
from tinygemma.serve.openai import EXAMPLE_PROMPTS

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "studio.png"


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder: a tiny model with fixed random weights, a few metrics lines and a samples report."""
    run = tmp_path / "tiny-run"
    trained = Path(os.environ.get("TINYGEMMA_UPDATE_SCREENSHOT", "-"), "best")
    if trained.is_dir():  # the README's screenshot shows a trained model, e.g. make demo's runs/demo
        shutil.copytree(trained, run / "best")
    else:
        torch.manual_seed(0)
        Gemma3(load_model_config("tiny")).save_pretrained(run / "best")
    lines = [{"step": s, "train_loss": 10.8 * 0.97 ** s + 1.5, "lr": 1e-3 * min(1, s / 10), "grad_norm": 2 / s ** .3,
              "tokens_per_s": 9000.0 + s, **({"val_loss": 10.8 * 0.97 ** s + 1.7} if s % 10 == 0 else {})}
             for s in range(1, 61)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "samples.html").write_text("<h1>Samples at step 60</h1>")
    return run


@pytest.mark.slow
def test_story_streams_in_the_browser(browser, run_dir, tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    trained = "TINYGEMMA_UPDATE_SCREENSHOT" in os.environ and (run_dir / "best" / "trainer_state.json").exists()
    app = create_app(run_dir, tokenizer=tokenizer)
    model = app.state.engine.model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # a few tokens per second, so the test can watch the story grow
        time.sleep(0.03)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20, poll_frequency=0.05)
        examples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .example"))
        assert [b.text for b in examples] == EXAMPLE_PROMPTS
        browser.find_element(By.ID, "seed").send_keys("42")
        examples[0].click()

        story = browser.find_element(By.ID, "story-text")
        first = wait.until(lambda d: story.text.strip() or False)
        grown = wait.until(lambda d: len(story.text) > len(first) + 10 and story.text)
        assert grown.strip().startswith(first), "text is appended, token by token"
        assert browser.find_element(By.ID, "story-prompt").text == EXAMPLE_PROMPTS[0]
        assert browser.find_element(By.ID, "tell").get_attribute("disabled") is not None
        stats = wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "story-stats").text
                           and d.find_element(By.ID, "story-stats").text)
        assert "tokens" in stats
        time.sleep(0.6)  # a little more story for the screenshot
        png = browser.get_screenshot_as_png()

        # random weights never end a 200-token story this soon, so in CI Stop always has work to stop;
        # a trained model (screenshot mode) may already have written <|endoftext|>
        if app.state.engine.active or not trained:
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda d: "stopped" in d.find_element(By.ID, "story-stats").text)
            assert wait.until(lambda d: app.state.engine.active == 0 or None), "Stop ended the generation"
            assert app.state.engine.stats["cancelled"] == 1
        assert wait.until(lambda d: d.find_element(By.ID, "tell").get_attribute("disabled") is None)
        assert not browser.find_element(By.ID, "story-error").is_displayed()

        # instructions: collapsed by default; filled in, they reach the model as the dataset's prompt
        words = browser.find_element(By.ID, "words")
        assert not words.is_displayed()
        browser.find_element(By.CSS_SELECTOR, "#instructions summary").click()
        words.send_keys("frog, jump")
        browser.find_element(By.CSS_SELECTOR, "#features input[value=Dialogue]").click()
        jobs, submit = [], app.state.engine.submit
        app.state.engine.submit = lambda job, *a: (jobs.append(job), submit(job, *a))[1]
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("3")
        browser.find_element(By.ID, "tell").click()
        assert wait.until(lambda d: jobs and "tokens/s" in d.find_element(By.ID, "story-stats").text)
        want = [tokenizer.eot_id] + tokenizer.encode(build_prompt(words=["frog", "jump"], features=["Dialogue"])
                                                     + EXAMPLE_PROMPTS[0])
        assert jobs[0].prompt_ids == [want]
        app.state.engine.submit = submit

        # the training page draws the curves from metrics.jsonl and shows the report
        browser.find_element(By.ID, "tab-training").click()
        summary = wait.until(lambda d: "step 60" in d.find_element(By.ID, "run-summary").text
                             and d.find_element(By.ID, "run-summary").text)
        assert "tiny-run" in summary and "val loss" in summary
        drawn = browser.execute_script(
            "const c = document.getElementById('chart-loss');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 150 && d[i] < 100) n++; return n;")
        assert drawn > 100, "the train-loss curve (blue) is drawn"
        assert browser.find_element(By.ID, "report").is_displayed()

    update = os.environ.get("TINYGEMMA_UPDATE_SCREENSHOT")
    _save_screenshot(png, SCREENSHOT if update else tmp_path / "studio.png")


def _save_screenshot(png: bytes, path: Path) -> None:
    """Save a small PNG (a 64-colour palette is plenty for a page of text)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width > 500 and len(image.getcolors(1 << 24)) > 10, "a page, not a blank screenshot"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    tmp.replace(path)
