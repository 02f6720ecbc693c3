"""`tinygemma generate`: stories from a checkpoint, printed as they are decoded."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from tinygemma.cli.args import (
    add_checkpoint_arg,
    add_dataclass_args,
    add_device_arg,
    add_dtype_arg,
    sampling_config_from_args,
)
from tinygemma.device import check_memory, generation_bytes, parse_device
from tinygemma.generate import Completions, TextStream, encode_prompts, generate_rows, prompt_room
from tinygemma.log import warn
from tinygemma.quant import load_for_inference
from tinygemma.sampling import SamplingConfig
from tinygemma.tokenizer import Tokenizer


def _generate(args: argparse.Namespace) -> int:
    from tinygemma.cli.args import prompt_from_args  # instruct imports this module

    cfg = sampling_config_from_args(args)
    prompts = args.prompt if args.prompt else [""]
    if (instructions := prompt_from_args(args)) is not None:  # TinyStories-Instruct header; --prompt opens the story
        prompts = [instructions + p for p in prompts]
    device = parse_device(args.device)
    model = load_for_inference(args.checkpoint, device, args.dtype)
    tok = Tokenizer()
    prompt_ids = encode_prompts(tok, prompts)
    keep = prompt_room(model.config.context_length, cfg.max_new_tokens)
    if any(len(p) > keep for p in prompt_ids):
        warn(f"prompt longer than {keep} tokens (context {model.config.context_length} - max_new_tokens); "
             f"keeping its last {keep}")
    n_rows = len(prompts) * cfg.num_samples  # checked before the rows are listed: a huge count is refused at once
    columns = min(max(map(len, prompt_ids)) + 1 + cfg.max_new_tokens, model.config.context_length)
    need = generation_bytes(model.config, n_rows, columns, model.lm_head.weight.dtype)
    check_memory(need, device, f"generating {n_rows} rows", "--num-samples or --max-new-tokens")
    rows = [(p, s) for p in range(len(prompts)) for s in range(cfg.num_samples)]
    live = not args.no_stream and not args.json and len(rows) == 1
    printer = _RowPrinter(tok, prompts, rows, live)
    if live:
        print(prompts[0], end="", flush=True)
    t0 = time.perf_counter()
    done = generate_rows(model, prompt_ids, cfg, compile=args.compile,
                         on_token=None if args.json else printer.on_token)
    elapsed = time.perf_counter() - t0
    n_tokens = sum(map(len, done.tokens)) + sum(done.ended)
    if args.json:
        print(json.dumps({"config": asdict(cfg), "tokens_per_s": n_tokens / elapsed, "samples": [
            {"prompt": prompts[p], "sample": s, "text": tok.decode(ids), "tokens": ids, "ended_with_eot": e}
            for (p, s), ids, e in zip(rows, done.tokens, done.ended, strict=True)]}, indent=2))
        return 0
    printer.finish(done)
    print(f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


class _RowPrinter:
    """The terminal side of ``tinygemma generate``: one row streams token by token; several rows are printed
    whole, in order, each as soon as it and all rows before it have ended."""

    def __init__(self, tok: Tokenizer, prompts: list[str], rows: list[tuple[int, int]], live: bool):
        self.tok, self.prompts, self.rows, self.live = tok, prompts, rows, live
        self.text = TextStream(tok)
        self.printed = 0

    def on_token(self, done: Completions, row: int, token: int) -> None:
        if self.live:
            if token != self.tok.eot_id:
                print(self.text.push(token), end="", flush=True)
        else:
            self._flush(done, final=False)

    def _flush(self, done: Completions, final: bool) -> None:
        while self.printed < len(self.rows) and (final or done.ended[self.printed]):
            p, s = self.rows[self.printed]
            if len(self.rows) > 1:
                print(f"--- prompt {p + 1}, sample {s + 1} ---")
            print(self.prompts[p] + self.tok.decode(done.tokens[self.printed]), flush=True)
            self.printed += 1

    def finish(self, done: Completions) -> None:
        if self.live:
            print(self.text.flush())
        else:
            self._flush(done, final=True)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="write stories from a checkpoint (KV-cache sampling)",
                       description="Sample stories from a checkpoint. Every prompt is preceded by <|endoftext|>; "
                                   "prompts too long for the context lose their oldest tokens.")
    add_checkpoint_arg(p)
    p.add_argument("--prompt", action="append", help="story opening (repeatable; default: an empty prompt)")
    from tinygemma.cli.args import add_instruction_args  # instruct imports this module

    add_instruction_args(p)
    add_dataclass_args(p, SamplingConfig)
    p.add_argument("--no-stream", action="store_true", help="print each story once finished")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_arg(p)
    add_dtype_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: CUDA graphs on a GPU; ~1.2x on a CPU after a 20-30 s compile")
    p.set_defaults(func=_generate)
