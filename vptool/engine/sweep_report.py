"""The reports of a ``vptool sweep``: ``<SWEEP_DIR>/sweep.csv``, ``sweep.json`` and ``sweep.png``, rewritten
atomically after every trial and at the end, and the command's result (``--json`` object or table).

Protocol (VPT, Jia et al. ECCV 2022, §4.1): the best trial is the one with the highest ``val_acc`` (the best
validation accuracy of its run; ties: the lowest grid index); test accuracy is reported for the selected point only,
never used to select it.
"""

from __future__ import annotations

from pathlib import Path

from vptool.engine.sweep_grid import Grid, GridPoint, display_value
from vptool.paths import write_csv_atomically, write_text_atomically

CSV_COLUMNS = ["trial", "overrides", "val_acc", "test_top1", "test_top5", "best_epoch", "seconds", "state", "error",
               "run_dir"]
_FIGURE_TITLE = "val_acc (%) per grid point; best selected on val (VPT §4.1)"


def report_row(grid: Grid, sweep_dir: Path, p: GridPoint) -> dict:
    """Grid point ``p``'s report row (see ``write_reports``)."""
    i = p.index
    row = {"index": i, "trial": grid.name(i), "overrides": grid.overrides(i),
           "params": {k: display_value(v) for k, v in grid.params(i).items()}, "state": p.state,
           "val_acc": None, "test_top1": None, "test_top5": None, "best_epoch": None, "seconds": None,
           "error": None, "run_dir": str(sweep_dir / grid.name(i)), "optuna_trial": None}
    t = p.complete or p.failed
    if p.complete is not None:
        s = t.user_attrs.get("summary") or {}
        row.update({k: s.get(k) for k in ("test_top1", "test_top5", "best_epoch", "seconds")})
        row["val_acc"] = t.value if t.value is not None else s.get("val_acc")
        row["run_dir"] = s.get("run_dir") or row["run_dir"]
    elif t is not None:
        row["error"] = t.user_attrs.get("error")
    if t is not None:
        row["optuna_trial"] = t.number
    return row


def write_reports(grid: Grid, sweep_dir: Path, points: list[GridPoint], about: dict, outputs: dict,
                  plot: bool = True) -> dict:
    """Write ``outputs["csv"]``, ``outputs["json"]`` (and with ``plot`` ``outputs["png"]``) from the point table.

    Args:
        grid: the sweep's grid.
        sweep_dir: the sweep directory.
        points: the point table (``grid_points``).
        about: ``{"study", "storage", "sweep_dir", "recipe", "sets"}``, the report's first fields.
        outputs: ``{"csv", "json", "png"}`` paths.
        plot: whether to write the figure too.

    Returns:
        The report (``Sweep.report``).
    """
    from vptool.engine.runstate import dumps_strict  # imports torch: only once there is a report to write

    rows = [report_row(grid, sweep_dir, p) for p in points]
    best = best_row(rows)
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("COMPLETE", "FAIL", "RUNNING", "PENDING")}
    data = {**about, "grid": grid.search_space(), "grid_points": len(grid), "counts": counts, "best": best,
            "rows": rows, "outputs": dict(outputs),
            "selection": "highest val_acc on the validation split (VPT §4.1); test accuracy is only reported"}

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}"
        return v

    write_csv_atomically(outputs["csv"], CSV_COLUMNS,
                         [[cell(" ".join(r["overrides"]) if c == "overrides" else r[c]) for c in CSV_COLUMNS]
                          for r in rows])
    write_text_atomically(outputs["json"], dumps_strict(data, indent=2) + "\n")
    if plot:
        from vptool.analysis.plots import save  # matplotlib: only for the figure

        save(sweep_figure(grid, rows, best), outputs["png"])
    return data


def best_row(rows: list[dict]) -> dict | None:
    """The selected grid point: selection is on the validation split only (VPT §4.1, as the official
    ``tune_fgvc.py`` picks lr and weight decay); ``test_top1`` is never looked at.

    Args:
        rows: report rows (``index``, ``state``, ``val_acc``, ...).

    Returns:
        The COMPLETE row with the highest ``val_acc`` (ties: the lowest grid index), or None if none completed.
    """
    done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r["val_acc"], (int, float))]
    return max(done, key=lambda r: (r["val_acc"], -r["index"])) if done else None


def sweep_figure(grid: Grid, rows: list[dict], best: dict | None):
    """val_acc per grid point: a heatmap for a two-key grid (first key down, second across), else bars; the best
    point is outlined (heatmap) or red (bars), points without a result are labelled with their state.

    Args:
        grid: the sweep's grid.
        rows: one report row per grid point, in grid order.
        best: the selected row (``best_row``) or None.

    Returns:
        A matplotlib Figure on the Agg canvas (``vptool.analysis.plots.save`` writes it).
    """
    if len(grid.keys) == 2:
        return _heatmap_figure(grid, rows, best)
    return _bar_figure(grid, rows, best)


def _heatmap_figure(grid: Grid, rows: list[dict], best: dict | None):
    """``sweep_figure`` for a two-key grid: val_acc as a heatmap, the best point outlined in red."""
    import numpy as np  # numpy and matplotlib: only for the figure
    from matplotlib.patches import Rectangle

    from vptool.analysis.plots import figure

    title = _FIGURE_TITLE
    n0, n1 = len(grid.values[0]), len(grid.values[1])
    acc = np.full((n0, n1), np.nan)
    for r in rows:
        a, b = divmod(r["index"], n1)
        if r["val_acc"] is not None:
            acc[a, b] = r["val_acc"]
    fig, ax = figure(max(6.0, 1.2 * n1 + 2.4), max(3.8, 0.8 * n0 + 1.8))
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="val_acc (%)")
    ax.set_xticks(range(n1), [str(display_value(v)) for v in grid.values[1]])
    ax.set_yticks(range(n0), [str(display_value(v)) for v in grid.values[0]])
    ax.set(xlabel=grid.keys[1], ylabel=grid.keys[0])
    ax.set_title(title, fontsize="medium")
    finite = acc[np.isfinite(acc)]
    mid = float(finite.mean()) if finite.size else 0.0
    for r in rows:
        a, b = divmod(r["index"], n1)
        text = f"{r['val_acc']:.1f}" if r["val_acc"] is not None else r["state"]
        ax.text(b, a, text, ha="center", va="center", fontsize="small",
                color="white" if r["val_acc"] is not None and r["val_acc"] < mid else "black")
    if best is not None:
        a, b = divmod(best["index"], n1)
        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return fig


def _bar_figure(grid: Grid, rows: list[dict], best: dict | None):
    """``sweep_figure`` for one key (or more than two): val_acc as bars, the best one red."""
    from vptool.analysis.plots import figure  # matplotlib: only for the figure

    title = _FIGURE_TITLE
    labels = ([str(display_value(v)) for v in grid.values[0]] if len(grid.keys) == 1
              else [r["trial"] for r in rows])
    fig, ax = figure(max(6.4, 0.5 * len(rows) + 2), 4.4)
    heights = [r["val_acc"] if r["val_acc"] is not None else 0.0 for r in rows]
    colors = ["tab:red" if best is not None and r["index"] == best["index"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), heights, color=colors)
    upright = len(grid.keys) == 1 and len(rows) <= 8
    top = max(heights) * 1.08 if max(heights) > 0 else 100.0
    ax.set_ylim(0, top)
    for x, r in enumerate(rows):
        if r["val_acc"] is None:
            ax.text(x, 0.02 * top, r["state"], ha="center", va="bottom", fontsize="x-small",
                    rotation=0 if upright else 90, clip_on=True)
    ax.set_xticks(range(len(rows)), labels, rotation=0 if upright else 90, fontsize="small")
    ax.set(ylabel="val_acc (%)", xlabel=grid.keys[0] if len(grid.keys) == 1 else "trial")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    return fig


def json_result(report: dict) -> dict:
    """The ``--json`` object of ``vptool sweep``.

    Args:
        report: ``Sweep.report()``'s result.

    Returns:
        The best row (its fields None when no trial completed) plus ``sweep_dir``, ``csv``, ``json``, ``png``,
        ``study``, ``storage``, ``grid_points`` and ``counts`` (grid points per state).
    """
    best = report["best"] or {k: None for k in ("index", "trial", "overrides", "params", "state", "val_acc",
                                                 "test_top1", "test_top5", "best_epoch", "seconds", "error",
                                                 "run_dir", "optuna_trial")}
    return {**best, "sweep_dir": report["sweep_dir"], **report["outputs"], "study": report["study"],
            "storage": report["storage"], "grid_points": report["grid_points"], "counts": report["counts"]}


def format_table(report: dict) -> str:
    """The plain-text result of ``vptool sweep``.

    Args:
        report: ``Sweep.report()``'s result.

    Returns:
        A table (one line per grid point: val_acc, test_top1, seconds, state, error), the best line and the
        report files.
    """
    rows = report["rows"]
    w = max([len("trial")] + [len(r["trial"]) for r in rows])

    def num(v, spec=".2f"):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"{'trial':<{w}}  {'val_acc':>8}  {'test_top1':>9}  {'seconds':>8}  state     error"]
    for r in rows:
        lines.append(f"{r['trial']:<{w}}  {num(r['val_acc']):>8}  {num(r['test_top1']):>9}  "
                     f"{num(r['seconds'], '.1f'):>8}  {r['state']:<8}  {(r['error'] or '')[:100]}")
    b = report["best"]
    if b is None:
        lines.append("best: none (no trial completed)")
    else:
        lines.append(f"best (highest val_acc, VPT §4.1): {b['trial']} ({' '.join(b['overrides'])}): val "
                     f"{b['val_acc']:.2f}%, test top-1 {num(b['test_top1'])}%  -> {b['run_dir']}")
    lines.append("-> " + ", ".join(report["outputs"].values()))
    return "\n".join(lines)
