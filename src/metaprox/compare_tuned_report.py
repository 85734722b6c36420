"""The tuned section of a ``metaprox compare`` report (from ``results["tuned"]``, see :mod:`metaprox.compare_tuned`):
the tuning budget, the chosen hyperparameters, tuned beside untuned test results, the verdicts, tuning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["tuned_markdown", "plot_tuning_curves", "TUNING_FIGURE"]

TUNING_FIGURE = "tuning_curves.png"


def plot_tuning_curves(results: dict[str, Any], path: Path) -> None:
    """Best validation objective so far against the trial number, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaprox.plots import save_figure
    from metaprox.tune_report import best_so_far

    tuned = results["tuned"]
    direction = next(iter(tuned["algorithms"].values()))["tuning"]["direction"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, a in tuned["algorithms"].items():
        done = [r for r in a["curve"] if r["value"] is not None]
        (line,) = ax.step([r["number"] for r in done], best_so_far([r["value"] for r in done], direction),
                          where="post", label=label)
        ax.plot([r["number"] for r in done], [r["value"] for r in done], ".", color=line.get_color(), alpha=0.4)
    ax.set_yscale("log" if direction == "minimize" else "linear")
    ax.set_xlabel("trial (pruned and failed trials have no point)")
    ax.set_ylabel("validation objective: best so far (line), each trial (dots)")
    ax.set_title(f"equal tuning budget: {tuned['budget']['trials']} trials × {tuned['budget']['steps']} iterations")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def _cell(v: float, ci: float, scale: float) -> str:
    return f"{v * scale:.3f} ± {ci * scale:.3f}"


def tuned_markdown(results: dict[str, Any]) -> list[str]:
    tuned = results["tuned"]
    algos = tuned["algorithms"]
    b = tuned["budget"]
    first = next(iter(algos.values()))
    metric = first["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = "accuracy (%)" if metric == "accuracy" else "MSE"
    steps = [str(s) for s in next(iter(first["summary"].values()))]
    full = first["config"]["outer"]["steps"]
    md = ["## Tuned: the same tuning budget for every algorithm", "",
          f"Each algorithm's search space (below) was searched with Optuna ({b['sampler']} sampler, seed {b['seed']}, "
          f"{b['pruner']} pruner) for **{b['trials']} finished trials** of **{b['steps']} meta-iterations** each, "
          f"validated every {b['eval_every']} iterations; the objective is the mean validation {unit} "
          f"({b['set'] or 'first set'}, {b['step']} test-time steps) on the same validation tasks for everyone "
          f"(seed {first['config']['eval']['val_seed']}, {first['config']['eval']['tasks']} tasks). Test tasks were "
          f"never built while tuning. Each best configuration was then retrained at the full budget ({full} "
          f"meta-iterations) with seeds {tuned['seeds']} and evaluated once on the test tasks.", "",
          "| algorithm | searched | chosen | best validation objective | trials (complete / pruned / failed) | "
          "retraining: training s per seed (mean) | peak RSS (MiB, max) |",
          "|---|---|---|---:|---|---:|---:|"]
    for label, a in algos.items():
        t = a["tuning"]
        states = t["states"]
        space = "; ".join(f"{k}: {v}" for k, v in t["space"].items())
        chosen = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in a["params"].items())
        train = [sd["train"] for sd in a["seeds"]]
        secs = f"{sum(x['train_s'] for x in train) / len(train):.1f}" if all("train_s" in x for x in train) else "–"
        rss = f"{max(x['peak_rss_mib'] for x in train):.0f}" if all("peak_rss_mib" in x for x in train) else "–"
        md.append(f"| {label} | {space} | {chosen} | {t['best']['value']:.4g} | {states.get('complete', 0)} / "
                  f"{states.get('pruned', 0)} / {states.get('fail', 0)} | {secs} | {rss} |")
    md += ["", f"![tuning curves]({TUNING_FIGURE})", "",
           f"### Test {unit}: untuned (paper hyperparameters, 1 seed) beside tuned (mean of {len(tuned['seeds'])} "
           "seeds)", "",
           "Tuned cells: mean ± 95% CI over the test tasks of each task's seed-averaged value; in brackets the range "
           "of the per-seed means. Untuned cells: the table above.", "",
           "| algorithm | shots | " + " | ".join(f"untuned, {s} steps | tuned, {s} steps" for s in steps) + " |",
           "|---|---|" + "---:|---:|" * len(steps)]
    for label, a in algos.items():
        for name, rows in a["summary"].items():
            untuned = results["algorithms"].get(label, {}).get("test", {}).get("sets", {}).get(name, {})
            cells = []
            for s in steps:
                u = untuned.get(s)
                key = "accuracy" if metric == "accuracy" else "loss"
                cells.append(_cell(u[key], u[key + "_ci95"], scale) if u else "–")
                r = rows[s]
                cells.append(f"{_cell(r['mean'], r['ci95'], scale)} [{min(r['seed_means']) * scale:.3f}, "
                             f"{max(r['seed_means']) * scale:.3f}]")
            md.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    md += ["", "### Which tuned differences are resolved", "",
           "Each algorithm against the best tuned one at that setting: the mean per-task difference with its 95% CI "
           "paired over the same test tasks; a difference is **resolved** only when the CI excludes 0 and every "
           "seed of the better algorithm beats every seed of the other. Otherwise it is inside the noise.", "",
           "| shots | steps | best | other | other − best | 95% CI excludes 0 | seeds apart | verdict |",
           "|---|---:|---|---|---:|---|---|---|"]
    for v in tuned["verdicts"]:
        md.append(f"| {v['set']} | {v['step']} | {v['best']} | {v['other']} | "
                  f"{_cell(v['diff'], v['ci95'], scale)} | {'yes' if v['ci_excludes_0'] else 'no'} | "
                  f"{'yes' if v['seeds_apart'] else 'no'} | "
                  f"{'**resolved**' if v['resolved'] else 'inside the noise'} |")
    md += ["", "Per-algorithm tuning details (all trials, best config as TOML, importances): "
           + ", ".join(f"[{lab}](tune/{lab}/trials.md)" for lab in algos) + ".", ""]
    return md
