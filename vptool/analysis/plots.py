"""Figures for the analyses (matplotlib, headless): NMI per block (SPT Fig. 2 axes), NMI per epoch, GateVPT
selection ratio per block (GateVPT Fig. 4) and the confusion matrix.

Figures are built with matplotlib's object API on the Agg canvas, so importing this module never changes the
caller's pyplot backend and needs no display. Each ``*_figure`` function returns the Figure (tests read its
data back); ``save`` writes it as PNG. Blocks are numbered 1..L as in the papers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vptool.paths import write_atomically


def figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, object]:
    """A Figure of ``width`` x ``height`` inches (120 dpi, constrained layout) on the Agg canvas, and its one axes."""
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


_figure = figure  # the former private name (kept for existing callers)


def _block_ticks(ax, n: int) -> None:
    step = max(1, int(np.ceil(n / 24)))
    ax.set_xticks(range(1, n + 1, step))


def nmi_blocks_figure(mean, std, title: str) -> Figure:
    """NMI (mean ± std over images) against block 1..L."""
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    blocks = np.arange(1, len(mean) + 1)
    fig, ax = figure()
    ax.plot(blocks, mean, marker="o", color="tab:red", label="mean over images")
    ax.fill_between(blocks, mean - std, mean + std, color="tab:red", alpha=0.2, label="± 1 std")
    ax.set(title=title, xlabel="block", ylabel="NMI(prompts; patch tokens)")
    _block_ticks(ax, len(blocks))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


def nmi_history_figure(epochs, values, title: str) -> Figure:
    """NMI against epoch, one line per block (SPT Fig. 2). ``values``: (E, L) mean NMI per epoch and block."""
    values = np.asarray(values, float)
    epochs = np.asarray(epochs)
    L = values.shape[1]
    fig, ax = figure(7.2, 4.4)
    cmap = colormaps["viridis"]
    for i in range(L):
        ax.plot(epochs, values[:, i], marker="." if len(epochs) < 30 else None,
                color=cmap(i / max(1, L - 1)), label=f"block {i + 1}")
    ax.set(title=title, xlabel="epoch (0 = initial prompts)", ylabel="NMI(prompts; patch tokens)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", ncols=1 if L <= 16 else 2)
    return fig


def nmi_compare_figure(runs: dict, title: str) -> Figure:
    """NMI against epoch for several runs: one panel per block (1..L), one line per run (SPT Fig. 2's VPT vs SPT).

    Args:
        runs: {label: (epochs, values (E, L))}.
    """
    L = len(np.asarray(next(iter(runs.values()))[1], float)[0])
    ncols = min(L, 4)
    nrows = int(np.ceil(L / ncols))
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows + 0.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = colormaps["tab10"]
    for b in range(nrows * ncols):
        ax = axes[b // ncols][b % ncols]
        if b >= L:
            ax.set_visible(False)
            continue
        for k, (label, (epochs, values)) in enumerate(runs.items()):
            ax.plot(epochs, np.asarray(values, float)[:, b], color=colors(k % 10), label=label)
        ax.set_title(f"block {b + 1}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if b % ncols == 0:
            ax.set_ylabel("NMI")
        if b // ncols == nrows - 1 or b + ncols >= L:
            ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=min(3, len(runs)),
               fontsize="small")
    return fig


def selection_ratio_figure(ratio, title: str) -> Figure:
    """GateVPT selection ratio r_l (eq. 11) as bars over blocks l = 1..L-1 (GateVPT Fig. 4)."""
    ratio = np.asarray(ratio, float)
    blocks = np.arange(1, len(ratio) + 1)
    fig, ax = figure()
    ax.bar(blocks, ratio, color="tab:blue")
    ax.set(title=title, xlabel="block", ylabel="selection ratio r (GateVPT eq. 11)",
           ylim=(0, max(1e-9, float(ratio.max())) * 1.1))
    _block_ticks(ax, len(blocks))
    ax.grid(alpha=0.3, axis="y")
    return fig


def confusion_figure(matrix, classes: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix (row = true class, column = predicted); counts printed when K <= 20."""
    cm = np.asarray(matrix, float)
    K = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(12.0, 3.0 + 0.3 * K)
    fig, ax = figure(side + 1.2, side)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    step = max(1, int(np.ceil(K / 30)))
    ticks = list(range(0, K, step))
    names = [str(c)[:16] for c in classes]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if K > 10 else 0, fontsize="small")
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize="small")
    if K <= 20:
        for r in range(K):
            for c in range(K):
                if cm[r, c]:
                    ax.text(c, r, f"{int(cm[r, c])}", ha="center", va="center", fontsize="x-small",
                            color="white" if norm[r, c] > 0.5 else "black")
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (a temporary file renamed into place)."""
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
