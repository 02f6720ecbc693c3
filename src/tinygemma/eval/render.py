"""Markdown and HTML helpers shared by every report."""

from __future__ import annotations

import math
import re

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|])")


def md_escape(text: str) -> str:
    """Markdown with its special characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def format_measure(key: str, value) -> str:
    if key == "ended_with_eot":
        return f"{value:.0%}" if isinstance(value, float) else ("yes" if value else "no")
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)
