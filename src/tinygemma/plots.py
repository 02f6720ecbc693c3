"""Figures of a run's metrics (what the tutorial's results folder showed) and of a next-token distribution.

Training writes them as PNGs at each evaluation; a notebook displays the same figures. They are built on
``matplotlib.figure.Figure`` rather than pyplot, so no backend or global figure state is involved: safe in
servers and tests, and they show exactly once in Jupyter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tinygemma.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure  # imported when drawing: it adds a second to every CLI start

    return Figure(figsize=(7, height), layout="tight")


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x values, key values) of the records that have both."""
    rows = [r for r in records if r.get(key) is not None and r.get(x) is not None]
    return [r[x] for r in rows], [r[key] for r in rows]


def save_png(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def loss_figure(records: list[dict]) -> Figure:
    """Train and validation loss against tokens seen, from ``metrics.jsonl`` records."""
    fig = _figure(4.2)
    ax = fig.subplots()
    for key, label, style in (("train_loss", "train (step batch)", "-"), ("eval_train_loss", "train (eval)", "o--"),
                              ("val_loss", "validation", "o-")):
        xs, ys = series(records, key, "tokens")
        if xs:
            ax.plot(xs, ys, style, label=label, alpha=0.45 if key == "train_loss" else 1.0, markersize=3)
    ax.set(xlabel="tokens", ylabel="cross-entropy loss (nats)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


METRIC_TITLES = {"lr": "learning rate", "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens/s"}


def metric_figure(records: list[dict], key: str) -> Figure:
    """One logged metric (``lr``, ``grad_norm``, ...) against the optimizer step."""
    fig = _figure(3.2)
    ax = fig.subplots()
    ax.plot(*series(records, key))
    ax.set(xlabel="step", ylabel=key, title=METRIC_TITLES.get(key, key))
    ax.grid(alpha=0.3)
    return fig


def next_token_figure(top: list[tuple[str, float]], prompt: str) -> Figure:
    """A bar chart of the most likely next tokens (as :func:`tinygemma.generate.top_next_tokens` returns them)."""
    fig = _figure(0.3 * len(top) + 1.2)
    ax = fig.subplots()
    labels = [repr(text) for text, _ in top]  # repr shows the leading spaces of GPT-2 tokens
    ax.barh(labels[::-1], [p for _, p in top][::-1])
    ax.set(xlabel="probability", title=f"next token after {prompt[-50:]!r}")
    ax.grid(alpha=0.3, axis="x")
    return fig


def write_plots(records: list[dict], out: str | os.PathLike) -> None:
    """Write ``loss.png`` (train/val loss vs tokens), ``lr.png`` and ``grad_norm.png`` (vs step) into ``out``."""
    figures = {"loss.png": loss_figure(records), "lr.png": metric_figure(records, "lr"),
               "grad_norm.png": metric_figure(records, "grad_norm")}
    for name, fig in figures.items():
        save_png(fig, Path(out) / name)
