"""Learning-curve figure of one run, drawn on a bare ``matplotlib.figure.Figure`` and saved
as PNG: no display needed, and pyplot's backend (e.g. a notebook's inline one) is untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike


def smooth(values: ArrayLike, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    values = np.asarray(values, float)
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    start = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def plot_learning_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Train (and eval, if logged) loss, log scale, and train/eval accuracy against the step;
    returns ``path``."""
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    if train:
        steps = np.array([r["step"] for r in train])
        window = max(1, len(train) // 50)
        ax_loss.plot(steps, [r["loss"] for r in train], color="C0", alpha=0.25, lw=0.8)
        ax_loss.plot(steps, smooth([r["loss"] for r in train], window), color="C0", label="train")
        ax_acc.plot(steps, smooth([r["accuracy"] for r in train], window), color="C0", label="train")
        if min(r["loss"] for r in train) > 0:
            ax_loss.set_yscale("log")
    if [r for r in evals if "loss" in r]:
        ax_loss.plot([r["step"] for r in evals if "loss" in r], [r["loss"] for r in evals if "loss" in r], "o-",
                     color="C1", label="eval")
        ax_loss.legend(loc="upper right")
    if evals:
        ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="C1", label="eval")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
