"""`tinygemma report`: one results page comparing runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygemma import rundir
from tinygemma.cli.args import add_dataclass_args, add_device_arg, dataclass_overrides
from tinygemma.config import UserError, from_dict
from tinygemma.device import parse_device
from tinygemma.eval.report import OUTPUT_FILES, ReportConfig, is_report_folder, write_report
from tinygemma.files import check_output_dir


def _report(args: argparse.Namespace) -> int:
    cfg = from_dict(ReportConfig, dataclass_overrides(args, ReportConfig), "report")
    if not cfg.out:
        raise UserError("--out is required")
    if not any(rundir.is_run_folder(r) for r in args.runs):
        raise UserError(f"no run folder among {', '.join(args.runs)} (a run folder holds run_config.json, "
                        "metrics.jsonl or a checkpoint)")
    check_output_dir(cfg.out, "--out", OUTPUT_FILES, force=args.force, ours=is_report_folder)
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
    p.add_argument("--force", action="store_true", help="replace report files in an --out that is not an earlier "
                                                        "report's folder")
    add_device_arg(p)
    p.set_defaults(func=_report)
