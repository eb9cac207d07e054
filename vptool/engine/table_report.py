"""The reports of ``vptool table``: ``table.json``, ``table.csv``, ``table.md`` and ``table.tex`` in the table
directory, rewritten atomically after every cell and at the end.

What a cell reports (``cell_result``): the test top-1 of the run the protocol names (FGVC: the grid point with the
best validation accuracy; VTAB-1k: the retrain of that point on train800val200), never a number chosen by test.
A cell still pending, running or failed is marked as such and never averaged in: a group mean exists only when every
cell of the group has a number.

The columns (every file): per task top-1 (%), per group the mean of its tasks' top-1 (VTAB-1k Natural / Specialized
/ Structured, FGVC mean: the papers' "Mean" columns), the paper's number and ours minus the paper's for each, and
per row:

- ``tuned_params_m``: the mean over the tasks of the trainable parameters (millions; SPT's "Params (M)");
- ``total_params``: the parameters needed for every task of the table, as a multiple of the backbone's (VPT Table 1's
  "Total params"): (the frozen parameters, shared by the tasks + the sum over the tasks of the trainable ones) /
  the backbone's parameters (``summary.json``'s ``backbone_params``). Full fine-tuning of 24 tasks gives about
  24x, a linear probe about 1x.

``table.csv`` is long (one line per row and task, group mean or row total) so that it reads into pandas or
``jq``-like tools without parsing a layout; ``table.md`` and ``table.tex`` are the paper's wide layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from vptool.paths import write_csv_atomically, write_text_atomically

CSV_COLUMNS = ["row", "column", "group", "protocol", "kind", "state", "top1", "paper", "delta", "val_acc", "selected",
               "trainable_params", "run_dir"]
STATES = ("done", "running", "pending", "failed")


def _rel(path: str | None, base: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _summary(run_dir: str | None) -> dict:
    if not run_dir:
        return {}
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cell_result(cell) -> dict:
    """What cell ``cell`` (``vptool.engine.table.Cell``) reports now.

    Returns:
        ``{"row", "row_slug", "column", "group", "protocol", "state"`` (done / running / pending / failed),
        ``"val_acc"`` (the selected point's validation top-1 in the search), ``"test_top1"`` (the cell's number),
        ``"selected"`` (the selected point's ``--set`` items), ``"grid_points"``, ``"run_dir"`` (the run whose test
        is reported), ``"trainable_params"``, ``"total_params"``, ``"backbone_params"``, ``"error"}``.
    """
    out = {"row": cell.row.name, "row_slug": cell.row.slug, "column": cell.column.name, "group": cell.group.name,
           "protocol": cell.protocol, "state": "pending", "val_acc": None, "test_top1": None, "selected": None,
           "grid_points": None, "run_dir": None, "trainable_params": None, "total_params": None,
           "backbone_params": None, "error": None}
    tune = cell.tune_report
    if tune is None:
        return out
    out["grid_points"] = tune["grid_points"]
    counts = tune["counts"]
    if counts["RUNNING"] or counts["PENDING"]:
        out["state"] = "running" if counts["RUNNING"] or counts["COMPLETE"] or counts["FAIL"] else "pending"
        return out
    best = tune["best"]
    if best is None:
        first = next((r for r in tune["rows"] if r["state"] == "FAIL"), None)
        out.update(state="failed", error=(first or {}).get("error") or "every grid point failed")
        return out
    out.update(val_acc=best["val_acc"], selected=list(best["overrides"]))
    reported = best
    if cell.protocol == "vtab-1k":
        final = cell.final_report
        if final is None or final["counts"]["RUNNING"] or final["counts"]["PENDING"]:
            out["state"] = "running"
            return out
        reported = final["rows"][0]
        if reported["state"] != "COMPLETE":
            out.update(state="failed", error=reported.get("error") or "the retrain on train800val200 failed")
            return out
    s = _summary(reported.get("run_dir"))
    out.update(state="done", test_top1=reported["test_top1"], run_dir=reported.get("run_dir"),
               trainable_params=s.get("trainable_params"), total_params=s.get("total_params"),
               backbone_params=s.get("backbone_params"))
    return out


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values and all(isinstance(v, (int, float)) for v in values) else None


def _delta(ours, paper) -> float | None:
    if isinstance(ours, (int, float)) and isinstance(paper, (int, float)):
        return ours - paper
    return None


def total_params_multiple(cells: list[dict]) -> float | None:
    """VPT Table 1's "Total params" of one row (module docstring); None until every cell has its counts."""
    if not cells or any(c["state"] != "done" or not isinstance(c["trainable_params"], int) for c in cells):
        return None
    first = cells[0]
    frozen = (first["total_params"] or 0) - first["trainable_params"]
    backbone = first["backbone_params"] or frozen
    if not backbone:
        return None
    return (frozen + sum(c["trainable_params"] for c in cells)) / backbone


class TableReport:
    """Writes the four report files of one table (``spec``: the ``TableSpec``) into ``table_dir``."""

    def __init__(self, spec, table_dir: Path):
        self.spec, self.table_dir = spec, Path(table_dir)
        self.outputs = {k: str(self.table_dir / f"table.{k}") for k in ("md", "csv", "tex", "json")}

    def build(self, results: list[dict], storage: str | None = None) -> dict:
        """The report (``table.json``'s content) from the cells' results (``cell_result``, row-major)."""
        spec = self.spec
        by = {(r["row"], r["column"]): r for r in results}
        rows = []
        for row in spec.rows:
            cells = [dict(by[(row.name, c.name)]) for c in spec.columns]
            for c in cells:
                c["paper"] = row.paper.get(c["column"])
                c["delta"] = _delta(c["test_top1"], c["paper"])
            groups = []
            for g in spec.groups:
                members = [c for c in cells if c["group"] == g.name]
                done = [c for c in members if c["state"] == "done"]
                ours = _mean([c["test_top1"] for c in members]) if len(done) == len(members) else None
                paper = row.paper.get(g.name)
                if paper is None:
                    paper = _mean([c["paper"] for c in members])
                groups.append({"group": g.name, "protocol": g.protocol, "tasks": len(members), "done": len(done),
                               "mean": ours, "paper": paper, "delta": _delta(ours, paper)})
            trainable = [c["trainable_params"] for c in cells]
            tuned = (_mean(trainable) / 1e6 if all(c["state"] == "done" for c in cells) and _mean(trainable)
                     is not None else None)
            total = total_params_multiple(cells)
            rows.append({"row": row.name, "recipe": str(row.recipe), "cells": cells, "groups": groups,
                         "tuned_params_m": tuned, "paper_tuned_params_m": row.paper.get("tuned_params_m"),
                         "total_params": total, "paper_total_params": row.paper.get("total_params")})
        counts = {s: sum(1 for r in results if r["state"] == s) for s in STATES}
        return {"table": spec.name, "title": spec.title, "source": spec.source, "table_dir": str(self.table_dir),
                "storage": storage, "complete": counts["done"] + counts["failed"] == len(results), "counts": counts,
                "columns": [{"name": c.name, "group": c.group} for c in spec.columns],
                "groups": [{"name": g.name, "protocol": g.protocol} for g in spec.groups], "rows": rows,
                "cells": results, "outputs": dict(self.outputs),
                "selection": "FGVC: the grid point with the best val top-1, its test top-1; VTAB-1k: that point "
                             "tuned on train800/val200, retrained on train800val200, its test top-1 (VPT §4.1)"}

    def write(self, results: list[dict], storage: str | None = None) -> dict:
        """Build the report and write the four files atomically; returns the report."""
        from vptool.engine.runstate import dumps_strict  # imports torch: only once there is a report

        report = self.build(results, storage)
        write_csv_atomically(self.outputs["csv"], CSV_COLUMNS, csv_lines(report, self.table_dir))
        write_text_atomically(self.outputs["md"], markdown(report))
        write_text_atomically(self.outputs["tex"], latex(report))
        write_text_atomically(self.outputs["json"], dumps_strict(report, indent=2) + "\n")
        return report


def _num(v, spec: str = ".4f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else ""


def csv_lines(report: dict, table_dir: Path) -> list[list[str]]:
    """``table.csv``'s lines (``CSV_COLUMNS``): per row, its tasks, its group means, then its parameter totals."""
    out = []
    for row in report["rows"]:
        for c in row["cells"]:
            out.append([row["row"], c["column"], c["group"], c["protocol"], "task", c["state"], _num(c["test_top1"]),
                        _num(c["paper"]), _num(c["delta"]), _num(c["val_acc"]), " ".join(c["selected"] or []),
                        "" if c["trainable_params"] is None else str(c["trainable_params"]),
                        _rel(c["run_dir"], table_dir) or ""])
        for g in row["groups"]:
            state = "done" if g["mean"] is not None else f"{g['done']}/{g['tasks']} done"
            out.append([row["row"], "", g["group"], g["protocol"], "group_mean", state, _num(g["mean"]),
                        _num(g["paper"]), _num(g["delta"]), "", "", "", ""])
        for kind in ("tuned_params_m", "total_params"):
            ours, paper = row[kind], row[f"paper_{kind}"]
            out.append([row["row"], "", "", "", kind, "done" if ours is not None else "incomplete", _num(ours),
                        _num(paper), _num(_delta(ours, paper)), "", "", "", ""])
    return out


def _cell_text(state: str, ours, paper, digits: int = 2) -> tuple[str, str]:
    """(our number or the state, the paper's number and our delta)."""
    main = format(ours, f".{digits}f") if ours is not None else {"running": "running", "pending": "pending",
                                                                   "failed": "FAILED"}.get(state, state)
    if paper is None:
        return main, ""
    d = _delta(ours, paper)
    return main, f"{paper:.{digits}f}" + (f" ({d:+.{digits}f})" if d is not None else "")


def _layout(report: dict) -> list[tuple[str, str]]:
    """The wide layout's columns in order: ("task", name) per column, ("group", name) after a group's last task."""
    order = []
    for g in report["groups"]:
        for c in report["columns"]:
            if c["group"] == g["name"]:
                order.append(("task", c["name"]))
        order.append(("group", g["name"]))
    return order


def _wide(report: dict) -> tuple[list[str], list[list[tuple[str, str]]]]:
    layout = _layout(report)
    header = ["method", *(n if k == "task" else f"{n} mean" for k, n in layout), "tuned (M)", "total params"]
    lines = []
    for row in report["rows"]:
        cells = {c["column"]: c for c in row["cells"]}
        groups = {g["group"]: g for g in row["groups"]}
        line = [(row["row"], "")]
        for k, n in layout:
            if k == "task":
                c = cells[n]
                line.append(_cell_text(c["state"], c["test_top1"], c["paper"]))
            else:
                g = groups[n]
                line.append(_cell_text("done" if g["mean"] is not None else f"{g['done']}/{g['tasks']}",
                                       g["mean"], g["paper"]))
        line.append(_cell_text("-", row["tuned_params_m"], row["paper_tuned_params_m"], 3))
        total = _cell_text("-", row["total_params"], row["paper_total_params"])
        line.append((total[0] + ("x" if row["total_params"] is not None else ""), total[1]))
        lines.append(line)
    return header, lines


def markdown(report: dict) -> str:
    """``table.md``: the paper's layout, each cell "ours<br>paper (ours - paper)"."""
    header, lines = _wide(report)
    counts = report["counts"]
    out = [f"# {report['title']}", ""]
    if report["source"]:
        out += [f"Paper: {report['source']}", ""]
    out += [f"Top-1 (%) on test; {report['selection']}. Each cell: ours, then the paper's number (ours minus the "
            f"paper's). Cells: {counts['done']} done, {counts['running']} running, {counts['pending']} pending, "
            f"{counts['failed']} failed; a group mean needs every task of its group.", ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for line in lines:
        out.append("| " + " | ".join(a + (f"<br>{b}" if b else "") for a, b in line) + " |")
    return "\n".join(out) + "\n"


def _tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
             "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in text)


def latex(report: dict) -> str:
    """``table.tex``: a ``tabular`` (booktabs) in the paper's layout, the paper's number under ours, small."""
    header, lines = _wide(report)
    out = [f"% {report['title']}" + (f" -- {report['source']}" if report["source"] else ""),
           "% written by vptool table; needs \\usepackage{booktabs}",
           "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
           " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    for line in lines:
        out.append(" & ".join(_tex_escape(a) for a, _ in line) + " \\\\")
        if any(b for _, b in line[1:]):
            out.append(" & ".join([""] + [("{\\scriptsize " + _tex_escape(b) + "}") if b else "" for _, b in line[1:]])
                       + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"
