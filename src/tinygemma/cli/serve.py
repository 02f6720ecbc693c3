"""`tinygemma serve`: the studio and the OpenAI-style API."""

from __future__ import annotations

import argparse
import sys

from tinygemma.cli.args import (
    add_checkpoint_arg,
    add_dataclass_args,
    add_device_arg,
    add_dtype_arg,
    dataclass_overrides,
)
from tinygemma.config import from_dict
from tinygemma.device import parse_device
from tinygemma.log import warn
from tinygemma.serve.app import base_url, bind, create_app, is_loopback, uvicorn_server
from tinygemma.serve.config import ServeConfig


def _serve(args: argparse.Namespace) -> int:
    cfg = from_dict(ServeConfig, dataclass_overrides(args, ServeConfig), "serve")
    device = parse_device(args.device)
    app = create_app(args.checkpoint, cfg, device=device, dtype=args.dtype)
    sock = bind(cfg.host, cfg.port)
    if not is_loopback(cfg.host):
        warn(f"listening on {cfg.host}, not loopback: anyone who can reach this machine can use the model "
             "(there is no authentication)")
    print(f"tinygemma studio: {base_url(cfg.host, sock.getsockname()[1])}/  (API: /v1/completions, Ctrl-C stops)",
          file=sys.stderr, flush=True)
    uvicorn_server(app, "info").run(sockets=[sock])
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page that streams stories and shows training; OpenAI-style API",
                       description="Serve a checkpoint (or a run folder: its best/ model plus its training "
                                   "curves and latest samples report) on a local web page and an "
                                   "OpenAI-style completions API.")
    add_checkpoint_arg(p, metavar="CKPT_OR_RUN")
    add_dataclass_args(p, ServeConfig)
    # the old limit ("generations at a time") is now the queue beside the batch: more requests fit, never fewer
    p.add_argument("--max-concurrent", dest="queue", type=int, default=None, help="old name of --queue")
    add_device_arg(p)
    add_dtype_arg(p)
    p.set_defaults(func=_serve)
