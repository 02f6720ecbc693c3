"""What only a CUDA GPU can show (skipped without one): loss parity with transformers in bf16/fp16, eager and
compiled; a compiled run resumed bit for bit with --deterministic; no recompiles after the first evaluation.
scripts/gpu_check.sh runs the same paths at full size."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinygemma import rundir
from tinygemma.model import Gemma3, load_model_config
from tinygemma.train.trainer import Trainer

pytestmark = pytest.mark.cuda
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_loss_matches_transformers_in_low_precision(dtype, compiled):
    from transformers import AutoModelForCausalLM

    if dtype == torch.bfloat16 and not BF16:
        pytest.skip("no native bf16 on this GPU")
    torch.manual_seed(0)
    mc = load_model_config("small")
    ours = Gemma3(mc).cuda()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").cuda()
    x = torch.randint(0, mc.vocab_size, (4, 257), device="cuda")  # block 256 > the window: the masked path
    run = torch.compile(ours) if compiled else ours
    with torch.no_grad():
        reference = F.cross_entropy(hf(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).item()
        with torch.autocast("cuda", dtype=dtype):
            low = run(x[:, :-1], x[:, 1:])[1].item()
    assert abs(low - reference) < 0.02, (low, reference)


def _config(data_dir, out, **kw):
    return {"data": str(data_dir), "out": str(out), "model": "tiny", "device": "cuda", "compile": True,
            "deterministic": True, "block_size": 64, "micro_batch": 4, "grad_accum": 1, "max_steps": 10,
            "eval_interval": 5, "eval_batches": 1, "log_interval": 1, "progress": False, **kw}


@pytest.mark.slow
def test_compiled_run_resumes_bit_for_bit(data_dir, tmp_path):
    cli = [sys.executable, "-m", "tinygemma", "train", "--data", str(data_dir), "--model", "tiny", "--device", "cuda",
           "--compile", "--deterministic", "--block-size", "64", "--micro-batch", "4", "--grad-accum", "1",
           "--max-steps", "10", "--eval-interval", "5", "--eval-batches", "1", "--no-progress"]
    subprocess.run(cli + ["--out", str(tmp_path / "straight")], check=True)
    killed = subprocess.run(cli + ["--out", str(tmp_path / "stopped")], env={**os.environ, "TINYGEMMA_FAULT": "step:7"})
    assert killed.returncode != 0  # died after step 7, as a SIGKILL would: checkpoint-5 is the last
    subprocess.run(cli + ["--out", str(tmp_path / "stopped"), "--resume", "auto"], check=True)
    a, b = (load_file(rundir.checkpoint_dir(tmp_path / d, 10) / "model.safetensors") for d in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_no_recompiles_after_the_first_evaluation(data_dir, tmp_path):
    trainer = Trainer(_config(data_dir, tmp_path / "run", deterministic=False), recipe="default")
    try:
        for _ in range(2):  # compiles the training graph (and its backward) and the evaluation graph
            trainer.train_step()
        trainer.evaluate()
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile from here on raises
            for _ in range(3):
                trainer.train_step()
            trainer.evaluate()
    finally:
        trainer.close()
