"""The loss curve a training run draws: ``loss.png`` in the run folder, also shown as a Prefect image artifact."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Train/validation loss per epoch as a PNG (matplotlib's Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss (label-smoothed CE)", title="DeCap decoder")
    ax.legend()
    fig.savefig(path, dpi=80)


def data_url(path: Path) -> str:
    """A PNG file as a ``data:`` URL, which an ``<img>`` shows with no file server (about 25 kB for loss.png)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
