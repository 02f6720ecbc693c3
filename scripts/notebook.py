"""Execute a notebook headless (nbclient + ipykernel) and save it with its outputs: ``make notebook``.

    python scripts/notebook.py                                   # notebooks/inference.ipynb in place (runs/demo)
    python scripts/notebook.py --set RUN=runs/x --out x.ipynb    # other inputs, saved elsewhere

A notebook's inputs are assignments in its code cell tagged ``parameters`` (papermill's convention);
``--set NAME=PATH`` replaces one in memory. The kernel runs in the notebook's folder and given paths are
made relative to it, so the saved outputs hold no absolute path of this machine. The file is written
only when every cell ran without error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tinygemma.config import UserError
from tinygemma.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def set_parameters(nb: nbformat.NotebookNode, paths: dict[str, str], cwd: Path) -> None:
    """Point the ``parameters`` cell's assignments ``NAME = ...`` at the given paths (relative to ``cwd``)."""
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise UserError("the notebook has no cell tagged 'parameters'")
    for name, path in paths.items():
        value = os.path.relpath(os.path.abspath(path), cwd)
        line = re.compile(rf"^{re.escape(name)} = .*?(?=\s+#|$)", re.MULTILINE)
        if not line.search(cell.source):
            raise UserError(f"the parameters cell assigns no {name}")
        cell.source = line.sub(lambda _, new=f"{name} = {value!r}": new, cell.source, count=1)


def execute(path: Path, paths: dict[str, str], timeout: int) -> nbformat.NotebookNode:
    """The notebook at ``path`` with ``paths`` set, executed in its folder."""
    nb = nbformat.read(path, as_version=4)
    set_parameters(nb, paths, path.parent)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, coalesce_streams=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", nargs="?", default=str(ROOT / "notebooks" / "inference.ipynb"))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=PATH",
                   help="a path parameter of the notebook (repeatable)")
    p.add_argument("--out", help="where to save the executed notebook (default: in place)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell at most")
    args = p.parse_args(argv)
    try:
        paths = dict(s.split("=", 1) for s in args.sets if "=" in s)
        if len(paths) != len(args.sets):
            raise UserError("--set takes NAME=PATH")
        nb = execute(Path(args.notebook), paths, args.timeout)
    except UserError as e:
        print(f"notebook: error: {e}", file=sys.stderr)
        return 2
    except CellExecutionError as e:
        print(f"notebook: a cell failed; {args.notebook} is left as it was\n{e}", file=sys.stderr)
        return 1
    atomic_write(args.out or args.notebook, lambda tmp: nbformat.write(nb, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
