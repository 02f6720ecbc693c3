"""`tinygemma report`: one results page comparing runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygemma.cli.args import add_dataclass_args, add_device_arg, dataclass_overrides
from tinygemma.config import from_dict
from tinygemma.device import parse_device
from tinygemma.eval.report import ReportConfig, write_report


def _report(args: argparse.Namespace) -> int:
    cfg = from_dict(ReportConfig, dataclass_overrides(args, ReportConfig), "report")
    res = write_report(args.runs, cfg, parse_device(args.device))
    for r in res["runs"]:
        for p in r["problems"]:
            print(f"  {r['name']}: {p}")
    print(f"wrote {', '.join(str(Path(cfg.out) / f) for f in res['files'])}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one Markdown + HTML results page comparing runs",
                       description="Read what runs wrote, compute what is missing (cached in RUN/report_cache.json) "
                                   "and write a results page with plots.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    add_dataclass_args(p, ReportConfig)
    add_device_arg(p)
    p.set_defaults(func=_report)
