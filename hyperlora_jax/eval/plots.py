"""PNG plots: accuracy vs context length, memory vs context length, training loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import json

import matplotlib.pyplot as plt  # noqa: E402

from hyperlora_jax.paths import save_figure  # noqa: E402


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    ylim: tuple[float, float] | None = None,
    hline: tuple[float, str] | None = None,
):
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    if logx and all(x > 0 for xs, _ in series.values() for x in xs):
        ax.set_xscale("log", base=2)
    if hline is not None:
        ax.axvline(hline[0], color="gray", linestyle="--", linewidth=1, label=hline[1])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def plot_accuracy_vs_length(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    metric: str = "accuracy",
    window: int | None = None,
    title: str = "Accuracy vs context length",
):
    """One line per method: {name: (context_tokens, score in [0, 1])}; `window` marks the base
    model's context window."""
    hline = (window, f"base window ({window})") if window else None
    return line_plot(
        series, path, "context length (tokens)", metric, title, ylim=(-0.02, 1.02), hline=hline
    )


def plot_memory_vs_length(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "Memory vs context length",
):
    """One line per quantity: {name: (context_tokens, MiB)}, e.g. KV cache vs adapter bytes."""
    return line_plot(series, path, "context length (tokens)", "memory (MiB)", title)


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path, title: str = "Training loss"):
    """The trainer's metrics.jsonl -> loss per step (raw and a 10-step moving average)."""

    rows = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed run's rows win
    steps = sorted(by_step)
    loss = [by_step[s] for s in steps]
    avg = [
        sum(loss[max(0, i - 9) : i + 1]) / len(loss[max(0, i - 9) : i + 1])
        for i in range(len(loss))
    ]
    series = {"loss": (steps, loss), "10-step mean": (steps, avg)}
    return line_plot(series, path, "step", "loss", title, logx=False)


def plot_confusion(
    matrix: Sequence[Sequence[int]],
    labels: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
):
    """Counts [true, predicted] as a heat map with the count in each non-empty cell."""
    import numpy as np

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(7.2, 6.4), dpi=100)
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for (i, j), v in np.ndenumerate(m):
        if v:
            color = "white" if v > m.max() / 2 else "black"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig
