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
