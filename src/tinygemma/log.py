"""Warnings on stderr, one format (``tinygemma: warning: ...``), through the ``tinygemma`` logger: a library
user silences or redirects them with logging's own settings; the command line installs the handler."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("tinygemma")


class _Stderr(logging.StreamHandler):
    """stderr as it is when a record is written (pytest's capture and redirections replace sys.stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


def install_handler() -> None:
    """``tinygemma: warning: ...`` lines on stderr for every ``tinygemma.*`` logger (once per process)."""
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format("tinygemma: %(level)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def warn(message: str) -> None:
    # a library user who configured logging keeps control; otherwise the same line as the command's
    if not logger.handlers and not logging.getLogger().handlers:
        install_handler()
    logger.warning(message)


# -- progress ---------------------------------------------------------------------------------------------
class LineProgress:
    """A progress bar for a log file: one line per tenth of ``total`` (and at the end), never a ``\\r``. The
    part of tqdm's interface the commands use: ``update``, ``set_postfix(_str)``, ``write``, ``close``, ``total``."""

    def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 disable: bool = False, file=None, **_):
        self.total, self.desc, self.unit, self.n, self.disable = total, desc or "progress", unit, initial, disable
        self.file = file
        self.postfix = ""
        self._shown = self._tenth()

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def _print(self, text: str) -> None:
        print(text, file=self.file or sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        tenth = self._tenth()
        if not self.disable and tenth > self._shown:
            self._shown = tenth
            self._print(self._line())

    def _line(self) -> str:
        of = f"/{self.total:,.0f} ({self.n / self.total:.0%})" if self.total else ""
        return f"{self.desc}: {self.n:,.0f}{of} {self.unit}" + (f"  {self.postfix}" if self.postfix else "")

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        if not self.disable:
            self._print(text)

    def close(self) -> None:
        if not self.disable and self.n and self._shown < 10 and (not self.total or self.n < self.total):
            self._print(self._line())
        self.disable = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: float | None = None, *, desc: str = "", unit: str = "it", disable: bool = False, file=None,
             **tqdm_args):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`LineProgress` (a line per tenth):
    a captured log gets a dozen lines, not one ``\\r`` update per step."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc or None, unit=unit, disable=disable, file=stream, dynamic_ncols=True,
                    **tqdm_args)
    return LineProgress(total, desc, unit, disable=disable, file=file, initial=tqdm_args.get("initial", 0))
