"""The report of ``metaprox compare``: ``README.md`` (tables) and PNG figures, rendered from ``results.json``.

Every number and label comes from the results dictionary that :func:`metaprox.compare.run_compare` wrote;
nothing is typed by hand. ``write_report(json.load(open("results.json")), out_dir)`` re-renders a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metaprox.bench.memory import memory_markdown, plot_memory  # noqa: E402
from metaprox.plots import save_figure  # noqa: E402

__all__ = ["write_report", "report_markdown"]

FIGURES = {"test": "test_mse_vs_steps.png", "time": "val_mse_vs_time.png", "memory": "memory_vs_steps.png"}
ACCURACY_FIGURES = {"test": "test_accuracy_vs_steps.png", "time": "val_accuracy_vs_time.png",
                    "memory": "memory_vs_steps.png"}


class _Metric:
    """What the report shows: the test loss as MSE (regression), or accuracy in % (classification)."""

    def __init__(self, results: dict[str, Any]):
        first = next(iter(results["algorithms"].values()))
        self.accuracy = first["test"].get("metric") == "accuracy"
        self.name = "accuracy (%)" if self.accuracy else "MSE"
        self.short = "accuracy" if self.accuracy else "MSE"
        self.scale = 100.0 if self.accuracy else 1.0

    def test(self, row: dict[str, Any]) -> tuple[float, float]:
        """(mean, 95 % CI) of one test row ``sets[name][str(step)]``."""
        key = "accuracy" if self.accuracy else "loss"
        return self.scale * row[key], self.scale * row[f"{key}_ci95"]

    def curve(self, sets_row: dict[str, Any]) -> list[float]:
        return [self.scale * v for v in sets_row["accuracy_curve" if self.accuracy else "curve"]]

    def val(self, curve_row: dict[str, Any], name: str, step: int) -> float:
        """One periodic-validation value: ``val_curve`` rows hold losses under "sets", accuracies under
        "accuracy"."""
        return self.scale * curve_row["accuracy" if self.accuracy else "sets"][name][str(step)]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.accuracy else a < b


def _sets(results: dict[str, Any]) -> list[str]:
    first = next(iter(results["algorithms"].values()))
    return list(first["test"]["sets"])


def plot_test_curves(results: dict[str, Any], path: Path) -> None:
    """Mean test MSE (or accuracy) against test-time steps, one panel per shot setting, 95% CI bars at the reported
    steps."""
    sets, metric = _sets(results), _Metric(results)
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        for label, a in results["algorithms"].items():
            s = a["test"]["sets"][name]
            curve = metric.curve(s)
            (line,) = ax.plot(range(len(curve)), curve, label=label)
            steps = a["test"]["steps"]
            points = [metric.test(s[str(k)]) for k in steps]
            ax.errorbar(steps, [p[0] for p in points], yerr=[p[1] for p in points],
                        fmt="o", color=line.get_color(), capsize=3, ms=4)
        if not metric.accuracy:
            ax.set_yscale("log")
        ax.set_xlabel("test-time inner steps")
        ax.set_ylabel(f"mean test {metric.name} (95% CI at reported steps)")
        ax.set_title(f"{name}, {int(s[str(steps[0])]['tasks'])} test tasks")
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_val_vs_time(results: dict[str, Any], step: int, path: Path) -> None:
    """Validation MSE (or accuracy) after ``step`` test-time steps against training seconds (top) and tasks seen
    (bottom)."""
    sets, metric = _sets(results), _Metric(results)
    fig, axes = plt.subplots(2, len(sets), figsize=(6 * len(sets), 8.5), squeeze=False, layout="constrained")
    for j, name in enumerate(sets):
        for label, a in results["algorithms"].items():
            rows = a["val_curve"]
            if not rows:
                continue
            y = [metric.val(r, name, step) for r in rows]
            axes[0][j].plot([r["time"] for r in rows], y, marker=".", label=label)
            axes[1][j].plot([r["tasks_seen"] for r in rows], y, marker=".", label=label)
        for i, xlabel in enumerate(("training wall-clock (s, validation excluded)", "meta-training tasks seen")):
            ax = axes[i][j]
            if not metric.accuracy:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"val {metric.name} after {step} steps")
            ax.set_title(f"{name} (validation tasks)")
            ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def _cpu_note(results: dict[str, Any]) -> str:
    if "cpu_seconds" not in results:
        return ""
    reused = [lab for lab, a in results["algorithms"].items() if a["train"].get("reused")]
    note = (f" and {results['cpu_seconds'] / 60:.1f} min of CPU time (this process and its subprocesses; 1-minute "
            f"load average {results['loadavg_start'][0]:.1f} at the start, {results['loadavg_end'][0]:.1f} at the "
            f"end — the machine is shared, so wall-clock times include waiting for the CPU)")
    if reused:
        note += f"; the training runs of {', '.join(reused)} were reused from an earlier invocation"
    return note


def _speed_lines(results: dict[str, Any], step: int) -> list[str]:
    """Per shot setting: each algorithm's final validation MSE (or accuracy) and the training seconds (and tasks)
    it needed to first reach the level that every algorithm reaches (the worst final value among them)."""
    algos = {lab: a for lab, a in results["algorithms"].items() if a["val_curve"]}
    if not algos:
        return []
    metric = _Metric(results)
    lines = [f"| algorithm | shots | final val {metric.name} | level | training s to reach it | tasks seen to reach "
             "it |", "|---|---|---:|---:|---:|---:|"]
    for name in _sets(results):
        final = {lab: metric.val(a["val_curve"][-1], name, step) for lab, a in algos.items()}
        level = min(final.values()) if metric.accuracy else max(final.values())
        for lab, a in algos.items():
            hit = next(r for r in a["val_curve"] if not metric.better(level, metric.val(r, name, step)))
            lines.append(f"| {lab} | {name} | {final[lab]:.3f} | {level:.3f} | {hit['time']:.1f} | "
                         f"{hit['tasks_seen']:,} |")
    return lines


def _fmt(v: float, ci: float) -> str:
    return f"{v:.3f} ± {ci:.3f}"


def _hyper_rows(results: dict[str, Any]) -> list[str]:
    lines = ["| algorithm | rule | inner (train) | λ (train) | outer | rule options | inner data (train) | "
             "test-time λ / lr | source |", "|---|---|---|---|---|---|---|---|---|"]
    for label, a in results["algorithms"].items():
        c = a["config"]
        i, o, r = c["inner"], c["outer"], c["rule"]
        opts = {"maml": f"first_order={r['first_order']}", "imaml": f"cg_steps={r['cg_steps']}"}.get(
            c["algorithm"], "–")
        data = ("support ∪ query" if r["inner_data"] == "support+query" else "support") + (
            " → query-loss meta-gradient" if c["algorithm"] in ("maml", "fomaml", "imaml") else
            " (query unused)" if r["inner_data"] == "support" else "")
        lam_t = a["test"]["test_time"]
        lines.append(f"| {label} | {c['algorithm']} | {i['solver']} lr {i['lr']} × {i['steps']} | "
                     f"{c['prox']['lam'] or '– (none)'} | {o['optimizer']} lr {o['lr']} ({o['schedule']}) | {opts} | "
                     f"{data} | {lam_t['lam'] or '–'} / {lam_t['lr']} | {a['source'] or '–'} |")
    return lines


def _protocol(shared: dict[str, Any]) -> list[str]:
    """The task lines of the protocol section: sine regression, or few-shot classification episodes."""
    t, e, mdl = shared["task"], shared["eval"], shared["model"]
    if t["family"] == "fewshot":
        model = f"{mdl['kind']} ({mdl['filters']} filters, BatchNorm {mdl['bn']})" if mdl["kind"] == "conv4" \
            else mdl["kind"]
        return [f"- the model: {model}, the same initialisation for everyone;",
                f"- a meta-training episode: {t['dataset']} ({t['split']} split), {t['ways']}-way, "
                f"{t['train_shots']} support + {t['queries']} query images per class;",
                f"- test: {e['tasks']} episodes of the test classes ({t['ways']}-way {t['shots']}-shot, "
                f"{t['eval_queries']} queries per class), seed {e['seed']}; validation episodes (seed "
                f"{e['val_seed']}) of the validation classes are the only ones used for monitoring/tuning;"]
    return [f"- the model: {mdl['kind']} {mdl['sizes']} {mdl['activation']}, the same initialisation for everyone;",
            f"- a meta-training task has {t['train_points']} support + {t['query_points']} query points "
            f"(amplitude U{t['amp_range']}, phase U[{t['phase_range'][0]:.3g}, {t['phase_range'][1]:.3g}], "
            f"x U{t['x_range']});",
            f"- test: {e['tasks']} tasks per shot setting ({', '.join(str(s) for s in e['shots'])} support points, "
            f"MSE on {e['points']} evenly spaced points), seed {e['seed']}; validation tasks (seed {e['val_seed']}) "
            f"are the only ones used for monitoring/tuning;"]


def report_markdown(results: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    metric = _Metric(results)
    figures = figures or (ACCURACY_FIGURES if metric.accuracy else FIGURES)
    algos = results["algorithms"]
    first = next(iter(algos.values()))
    shared = first["config"]
    t, o, e = shared["task"], shared["outer"], shared["eval"]
    what = (f"{t['dataset']} {t['ways']}-way {t['shots']}-shot classification" if t["family"] == "fewshot"
            else "sine regression")
    m = results["machine"]
    b = results["bench"]
    steps = first["test"]["steps"]
    cmd = results.get("command") or f"metaprox compare {results.get('config_path')} --out OUT"
    md = [f"# {results['name']}: {', '.join(algos)} on {what}", "",
          "Regenerate this directory (every number and figure below is written by this command):", "",
          "```bash", cmd, "```", "",
          f"Run on {m['cpu']} with {m['threads']} torch thread(s), torch {m['torch']}, metaprox {m['metaprox']} "
          f"(git {str(m.get('git_commit'))[:10]}); the whole command took "
          f"{results['total_seconds'] / 60:.1f} min wall-clock{_cpu_note(results)}. "
          "Raw numbers: [results.json](results.json).", "",
          "## Common budget and protocol", "",
          f"- every algorithm: {o['steps']} meta-iterations × meta-batch {o['meta_batch']} = "
          f"{o['steps'] * o['meta_batch']:,} meta-training tasks, the same task stream (seed {shared['seed']}) and "
          f"{shared['inner']['steps']} inner steps;", *_protocol(shared),
          f"- periodic validation every {shared['log']['eval_every']} iterations on {shared['log']['eval_tasks']} "
          f"validation tasks per shot setting; its time is excluded from the training clock.", "",
          "## Per-algorithm hyperparameters", "", *_hyper_rows(results), "",
          f"## Test {metric.name} (mean ± 95% CI over {e['tasks']} test tasks)", "",
          "| algorithm | shots | " + " | ".join(f"after {s} steps" for s in steps) + " |",
          "|---|---|" + "---:|" * len(steps)]
    for label, a in algos.items():
        for name, rows in a["test"]["sets"].items():
            md.append(f"| {label} | {name} | " + " | ".join(_fmt(*metric.test(rows[str(s)])) for s in steps) + " |")
    pick = max if metric.accuracy else min
    best = {name: pick(algos, key=lambda lab: metric.test(algos[lab]["test"]["sets"][name][str(steps[-1])])[0])
            for name in first["test"]["sets"]}
    md += ["", f"{'Highest' if metric.accuracy else 'Lowest'} mean test {metric.short} after {steps[-1]} steps: "
           + "; ".join(f"{n}: **{lab}**" for n, lab in best.items()) + " (overlapping CIs are not a difference).", "",
           f"![test {metric.short} vs test-time steps]({figures['test']})", "",
           "## Training cost", "",
           "Wall-clock of the training loop (periodic validation excluded; monitors every "
           f"{shared['log']['every']} iterations and checkpoints included), measured one algorithm after the other; "
           "CPU time of the training process includes its start-up and the periodic validation. Peak memory = peak RSS "
           "(`VmHWM`) of the training subprocess, which also holds Python and torch themselves "
           "(the per-iteration increase is in the memory section).", "",
           "| algorithm | training time (s) | ms / meta-iteration | tasks/s | CPU time of the training process (s) "
           "| 1-min load avg (start → end) | peak RSS of training process (MiB) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, a in algos.items():
        s, n = a["train"], a["config"]["outer"]["steps"]
        cpu = f"{s['cpu_s']:.1f}" if "cpu_s" in s else "–"
        load = " → ".join(f"{v:.1f}" for v in s["loadavg_1min"]) if "loadavg_1min" in s else "–"
        md.append(f"| {label} | {s['train_s']:.1f} | {1e3 * s['train_s'] / n:.2f} | "
                  f"{n * a['config']['outer']['meta_batch'] / s['train_s']:.0f} | {cpu} | {load} | "
                  f"{s['peak_rss_mib']:.0f} |")
    thr = results["throughput"]
    md += ["", f"## Throughput at B = {thr['tasks']} tasks, {thr['steps']} inner steps", "",
           f"Every algorithm's learner (its own hyperparameters, inner steps set to {thr['steps']}) on the same "
           f"batch of {thr['tasks']} meta-training tasks, in one process, rounds interleaved, median of "
           f"{thr['rounds']} rounds, {thr['threads']} thread(s), monitors off.", "", thr["markdown"], "",
           f"## Peak memory vs inner steps M ∈ {b['memory_steps']}", "",
           f"One meta-iteration on B = {results['memory']['tasks']} tasks per point, each point in a fresh "
           "subprocess: peak RSS increase over the RSS just before the iteration (after a warm-up step and a "
           "`clear_refs` reset of the high-water mark), glibc mmap threshold fixed at 128 KiB.", "",
           memory_markdown(results["memory"]["points"]), "", f"![memory vs inner steps]({figures['memory']})", "",
           f"## Validation {metric.short} vs training time (after {b['curve_step']} test-time steps)", "",
           f"Mean {metric.name} on {shared['log']['eval_tasks']} validation tasks per shot setting, recorded every "
           f"{shared['log']['eval_every']} iterations (time = training seconds so far, validation excluded). "
           f"'Level' is the worst final validation {metric.short} among the algorithms, a level all of them reach; "
           "the time to first reach it measures who learns fastest per second on this machine.", "",
           *_speed_lines(results, int(b["curve_step"])), "",
           f"![validation {metric.short} vs training time]({figures['time']})", ""]
    if results.get("tuned"):
        from metaprox.compare_tuned_report import tuned_markdown

        md += tuned_markdown(results)
    if results.get("notes"):
        md += ["## Notes (from the compare config)", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(md)


def write_report(results: dict[str, Any], out_dir: str | Path, figures: dict[str, str] | None = None) -> list[Path]:
    """Write ``README.md`` and the figures into ``out_dir``; returns the paths written."""
    figures = figures or (ACCURACY_FIGURES if _Metric(results).accuracy else FIGURES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_test_curves(results, out / figures["test"])
    plot_val_vs_time(results, int(results["bench"]["curve_step"]), out / figures["time"])
    b = results["bench"]
    plot_memory(results["memory"]["points"], out / figures["memory"],
                f"one meta-iteration, B = {results['memory']['tasks']} tasks, fresh process per point "
                f"(steps {b['memory_steps']})")
    written = [out / "README.md", *(out / f for f in figures.values())]
    if results.get("tuned"):
        from metaprox.compare_tuned_report import TUNING_FIGURE, plot_tuning_curves

        plot_tuning_curves(results, out / TUNING_FIGURE)
        written.append(out / TUNING_FIGURE)
    (out / "README.md").write_text(report_markdown(results, figures))
    return written
