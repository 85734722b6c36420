"""Figures of a finite run (``metaprox plot DIR`` with ``algorithm = "finite_mmp"``).

- ``plots/tasks-<split>.png``: each task's metric on its ``val``/``test`` rows against its number of training
  rows (log scale), one panel per metric of ``tasks-<split>.csv`` (written by ``metaprox eval``), with the pooled
  value as a line (a set of task kinds: one colour and pooled line per kind): do the small tasks do worse, and by
  how much?
- ``plots/objective.png``: the joint objective J (and the gap J − J* where the closed form exists) against outer
  steps, from ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from matplotlib.ticker import NullFormatter, ScalarFormatter

from metaprox.finite_eval import LABELS
from metaprox.plots import plt, save_figure
from metaprox.rundir import read_metrics

__all__ = ["plot_finite_run", "plot_task_metrics", "plot_objective"]


def plot_task_metrics(tasks_csv: Path, result: dict[str, Any], path: Path) -> None:
    with open(tasks_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = [k for k in rows[0] if k in LABELS]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    ev = result["eval"]
    # a set of kinds (column "kind"): each kind its own points and pooled line; else one group
    pooled = ev["pooled"] if "kinds" in ev else {None: ev["pooled"]}
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, kind in enumerate(pooled):
            mine = [r for r in rows if r.get("kind") == kind and r[m] != ""]
            label = "" if kind is None else f"{kind} "
            ax.scatter([int(r["train_rows"]) for r in mine], [float(r[m]) for r in mine], s=14, color=f"C{i}",
                       label=kind)
            if m in pooled[kind]:
                ax.axhline(pooled[kind][m], color="gray" if kind is None else f"C{i}", ls="--", lw=1,
                           label=f"{label}pooled {pooled[kind][m]:.3g}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training rows of the task")
        ax.set_ylabel(f"{LABELS[m]} on its {ev['split']} rows")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['dataset']}: {len(rows)} tasks, step {result['step']} ({ev['split']} split)", fontsize=9)
    save_figure(fig, path)


def plot_objective(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["J"] for r in rows], label="joint objective J")
    if all("gap" in r for r in rows):
        ax.plot(steps, [max(r["gap"], 1e-300) for r in rows], label="gap J − J* (closed form)")
    ax.set_yscale("log")
    ax.set_xlabel("outer step")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_finite_run(run_dir: str | Path) -> list[Path]:
    """Write the figures of the module doc into ``run_dir/plots``; returns their paths."""
    run_dir = Path(run_dir)
    out = []
    rows = read_metrics(run_dir)
    if rows:
        out.append(run_dir / "plots" / "objective.png")
        plot_objective(rows, out[-1])
    for split, stem in (("val", "eval-val"), ("test", "eval")):
        table, result = run_dir / f"tasks-{split}.csv", run_dir / f"{stem}.json"
        if table.is_file() and result.is_file():
            out.append(run_dir / "plots" / f"tasks-{split}.png")
            plot_task_metrics(table, json.loads(result.read_text()), out[-1])
    return out
