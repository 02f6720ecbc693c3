"""The one Markdown + HTML renderer of every report (samples, instruction following, the results page).

A page is a title and a list of blocks: ``("h2" | "h3" | "p", text)``, ``("list", items)``, ``("img", file, alt)``,
``("quote", title, text)``, ``("story", prompt, text)`` (a story with its prompt in bold), ``("note", text)`` (a
small grey line: a story's measures) and ``("table", header, rows)``. Report builders make blocks; only this module
knows either format.
"""

from __future__ import annotations

import html
import math
import re

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|])")
_CSS = ("body{font-family:sans-serif;max-width:60em;margin:auto;padding:0 1em}table{border-collapse:collapse}"
        "td,th{padding:.2em .6em;border-bottom:1px solid #ddd}td:not(:first-child){text-align:right}"
        "img{max-width:100%}blockquote{white-space:pre-wrap;border-left:3px solid #ccc;margin-left:0;"
        "padding-left:1em}.problems{color:#a40}.m{color:#666;font-size:90%}")


def md_escape(text: str) -> str:
    """Markdown with its special characters escaped."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def format_measure(key: str, value) -> str:
    if key == "ended_with_eot":
        return f"{value:.0%}" if isinstance(value, float) else ("yes" if value else "no")
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _md_block(kind: str, rest: list) -> list[str]:
    if kind in ("h2", "h3"):
        return [("## " if kind == "h2" else "### ") + md_escape(rest[0]), ""]
    if kind == "p":
        return [md_escape(rest[0]), ""]
    if kind == "note":
        return ["*" + md_escape(rest[0]) + "*", ""]
    if kind == "list":
        return [f"- {md_escape(x)}" for x in rest[0]] + [""]
    if kind == "img":
        return [f"![{rest[1]}]({rest[0]})", ""]
    if kind == "quote":
        return [f"**{md_escape(rest[0])}**", ""] + ["> " + md_escape(x) for x in rest[1].split("\n")] + [""]
    if kind == "story":
        return ["> " + md_escape(x) for x in (rest[0] + rest[1]).split("\n")] + [""]
    if kind == "table":
        header, rows = rest
        return (["| " + " | ".join(map(md_escape, header)) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
                + ["| " + " | ".join(md_escape(str(c)) for c in row) + " |" for row in rows] + [""])
    raise ValueError(f"unknown block kind {kind!r}")


def to_markdown(title: str, blocks: list[tuple]) -> str:
    lines = [f"# {md_escape(title)}", ""]
    for kind, *rest in blocks:
        lines += _md_block(kind, rest)
    return "\n".join(lines)


def _html_block(kind: str, rest: list) -> str:
    e = html.escape
    if kind in ("h2", "h3", "p"):
        return f"<{kind}>{e(rest[0])}</{kind}>"
    if kind == "note":
        return f"<p class='m'>{e(rest[0])}</p>"
    if kind == "list":
        return "<ul class='problems'>" + "".join(f"<li>{e(x)}</li>" for x in rest[0]) + "</ul>"
    if kind == "img":
        return f"<p><img src='{e(rest[0])}' alt='{e(rest[1])}'></p>"
    if kind == "quote":
        return f"<p><b>{e(rest[0])}</b></p><blockquote>{e(rest[1])}</blockquote>"
    if kind == "story":
        return f"<blockquote><b>{e(rest[0])}</b>{e(rest[1])}</blockquote>"
    if kind == "table":
        header, rows = rest
        return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>")
    raise ValueError(f"unknown block kind {kind!r}")


def to_html(title: str, blocks: list[tuple]) -> str:
    e = html.escape
    body = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
            f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    body += [_html_block(kind, rest) for kind, *rest in blocks]
    return "\n".join(body + ["</body></html>", ""])
