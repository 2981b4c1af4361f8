"""PNG figures of a run: learning curve and confusion matrix (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ._checkpoint import atomic_write


def _save(fig, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def learning_curve_figure(history: dict, title: str = ""):
    """The learning-curve figure: loss per epoch on a log axis (a linear one flattens every epoch after
    the first few onto zero) and accuracy, training and validation; the epoch whose weights were
    restored is marked only where validation data chose it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = history["epoch"]
    has_val = any(v is not None for v in history.get("val_loss", []))
    best = history.get("best_epoch")
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, history[key], label=f"train {label}")
        if has_val:
            ax.plot(epochs, [np.nan if v is None else v for v in history[f"val_{key}"]], label=f"validation {label}")
            if best and best > 0:
                ax.axvline(best, color="grey", linestyle=":", label=f"best validation (epoch {best}, restored)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label + (" (log scale)" if key == "loss" else ""))
        ax.grid(alpha=0.3, which="both" if key == "loss" else "major")
        ax.legend(fontsize=8)
    losses = [v for k in ("loss", "val_loss") for v in history.get(k, []) if v is not None]
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_acc.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    return fig


def learning_curve(history: dict, path: str | os.PathLike, title: str = "") -> None:
    """Write :func:`learning_curve_figure` as a PNG."""
    _save(learning_curve_figure(history, title), path)


def confusion_matrix_plot(
    cm: np.ndarray, labels: Sequence, path: str | os.PathLike, title: str = "confusion matrix"
) -> None:
    """Write :func:`confusion_matrix_figure` as a PNG."""
    _save(confusion_matrix_figure(cm, labels, title), path)


def confusion_matrix_figure(cm: np.ndarray, labels: Sequence, title: str = "confusion matrix"):
    """Counts with true labels on rows and predicted labels on columns."""
    from matplotlib.figure import Figure

    k = len(labels)
    size = max(3.5, 0.45 * k + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    names = [str(v) for v in labels]
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    return fig
