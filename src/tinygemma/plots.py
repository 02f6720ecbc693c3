"""PNG plots of a run's metrics (what the tutorial's results folder showed), refreshed at each evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from tinygemma.config import atomic_write


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(x values, key values) of the records that have both."""
    rows = [r for r in records if r.get(key) is not None and r.get(x) is not None]
    return [r[x] for r in rows], [r[key] for r in rows]


def save_png(fig, path: Path) -> None:
    """Lay out, write atomically and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_plots(records: list[dict], out: str | os.PathLike) -> None:
    """Write ``loss.png`` (train/val loss vs tokens), ``lr.png`` and ``grad_norm.png`` (vs step) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in servers and tests
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, style in (("train_loss", "train (step batch)", "-"), ("eval_train_loss", "train (eval)", "o--"),
                              ("val_loss", "validation", "o-")):
        xs, ys = series(records, key, "tokens")
        if xs:
            ax.plot(xs, ys, style, label=label, alpha=0.45 if key == "train_loss" else 1.0, markersize=3)
    ax.set(xlabel="tokens", ylabel="cross-entropy loss (nats)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, out / "loss.png")
    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)")):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(*series(records, key))
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        save_png(fig, out / f"{key}.png")
