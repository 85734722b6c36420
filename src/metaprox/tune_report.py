"""The outputs of a ``metaprox tune`` study: best config (TOML), trials table, best-so-far curve, importances.

``write_outputs(study, cfg, tune, out_dir)`` writes, atomically, into ``out_dir``:

    best.toml          the best trial's config at the config's full outer.steps: ``metaprox train best.toml``
    trials.csv         one row per trial: number, state, value, parameters, last reported step, worker, run dir
    trials.md          the same as a markdown table (finished trials, best first)
    best_so_far.png    the objective of each finished trial and the best so far, against the trial number
    importances.png    Optuna's parameter importances (PED-ANOVA, which needs no scikit-learn) when ≥ 2 trials
                       completed and ≥ 2 parameters vary
    summary.json       best value, parameters and trial; counts per state; the search space
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metaprox.checkpoint import atomic_write
from metaprox.tune import require_optuna, trial_config

__all__ = ["write_outputs", "toml_dumps", "trial_rows", "best_so_far"]

FILES = ("best.toml", "trials.csv", "trials.md", "best_so_far.png", "importances.png", "summary.json")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to TOML.")


def toml_dumps(cfg: Mapping[str, Any], where: str = "") -> str:
    """A nested dict as TOML (scalars and lists first, then one [table] per sub-dict); ``None`` values are
    left out (in a run config they mean "the default")."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in cfg.items() if v is not None
             and not isinstance(v, Mapping)]
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            name = f"{where}{_toml_key(k)}"
            lines += ["", f"[{name}]", toml_dumps(v, name + ".").rstrip("\n")]
    return "\n".join(line for line in lines) + "\n"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial (number order): number, state, value, parameters, last step reported, worker, run dir."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        value = t.value if t.state.name == "COMPLETE" else None  # a pruned trial's value is only its last report
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value,
                     **{f"param:{k}": v for k, v in t.params.items()},
                     "last_step": steps[-1] if steps else None,
                     "last_reported": t.intermediate_values[steps[-1]] if steps else None,
                     "note": t.user_attrs.get("diverged") and "diverged" or t.system_attrs.get("fail_reason", ""),
                     "worker": t.user_attrs.get("worker", ""), "run_dir": t.user_attrs.get("run_dir", "")})
    return rows


def best_so_far(values: list[float], direction: str) -> list[float]:
    out, best = [], math.inf if direction == "minimize" else -math.inf
    for v in values:
        best = min(best, v) if direction == "minimize" else max(best, v)
        out.append(best)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return "–" if v is None or v == "" else str(v)


def _markdown(rows: list[dict[str, Any]], direction: str) -> str:
    params = sorted({k for r in rows for k in r if k.startswith("param:")})
    head = ["trial", "state", "value", *[p[6:] for p in params], "last step", "last reported", "note", "run dir"]
    done = [r for r in rows if r["state"] == "complete"]
    done.sort(key=lambda r: r["value"], reverse=direction == "maximize")
    rest = [r for r in rows if r["state"] != "complete"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in done + rest:
        cells = [r["number"], r["state"], r["value"], *[r.get(p) for p in params], r["last_step"],
                 r["last_reported"], r["note"], r["run_dir"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_best_so_far(study: Any, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    direction = study.direction.name.lower()
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if done:
        ax.plot([t.number for t in done], [t.value for t in done], "o", ms=4, alpha=0.6, label="complete trial")
        ax.step([t.number for t in done], best_so_far([t.value for t in done], direction), where="post",
                label="best so far")
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED" and t.intermediate_values]
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "x", color="gray", label="pruned (last reported)")
    ax.set_xlabel("trial")
    ax.set_ylabel(("validation loss" if direction == "minimize" else "validation accuracy") + " (objective)")
    if done and direction == "minimize" and min(t.value for t in done) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def importances(study: Any) -> dict[str, float]:
    """Optuna's PED-ANOVA importances, or {} when there is too little to estimate (< 2 complete trials, or fewer
    than 2 varying parameters)."""
    optuna = require_optuna()
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    varying = {k for k in (done[0].params if done else {}) if len({json.dumps(t.params.get(k)) for t in done}) > 1}
    if len(done) < 2 or len(varying) < 2:
        return {}
    import warnings

    with warnings.catch_warnings():  # PED-ANOVA is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(varying)))


def plot_importances(values: Mapping[str, float], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * max(1, len(values))))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names])
        ax.set_xlabel("importance (PED-ANOVA, normalised to sum 1)")
    else:
        ax.text(0.5, 0.5, "too few complete trials (or varying parameters) to estimate", ha="center",
                va="center")
        ax.set_axis_off()
    ax.set_title(title)
    return _png(fig)


def write_outputs(study: Any, cfg: dict[str, Any], tune: Mapping[str, Any], out_dir: str | Path,
                  command: str | None = None) -> dict[str, Any]:
    """Write the files of :data:`FILES` into ``out_dir``; returns the summary (also ``summary.json``)."""
    out = Path(out_dir)
    rows = trial_rows(study)
    direction = study.direction.name.lower()
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    imp = importances(study)
    summary = {"study": study.study_name, "direction": direction, "states": states, "trials_target": tune["trials"],
               "objective": {"split": "val", "set": tune["set"], "step": tune["step"], "tasks": cfg["eval"]["tasks"],
                             "val_seed": cfg["eval"]["val_seed"]},
               "trial_steps": tune["steps"], "eval_every": tune["eval_every"], "sampler": tune["sampler"],
               "seed": tune["seed"], "pruner": tune["pruner"],
               "space": {d.key: d.describe() for d in tune["dims"]}, "importances": imp, "command": command,
               "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                                  "run_dir": best.user_attrs.get("run_dir")}}
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "trials.csv", buf.getvalue())
    atomic_write(out / "trials.md", _markdown(rows, direction))
    title = f"{study.study_name}: {len(complete)} complete of {len(rows)} trials"
    atomic_write(out / "best_so_far.png", plot_best_so_far(study, title))
    atomic_write(out / "importances.png", plot_importances(imp, f"{study.study_name}: parameter importances"))
    if best is not None:
        best_cfg = trial_config(cfg, tune, best.params, steps=cfg["outer"]["steps"])
        best_cfg.pop("tune")
        header = (f"# The best configuration of study {study.study_name!r}: trial {best.number}, validation "
                  f"{'loss' if direction == 'minimize' else 'accuracy'} {best.value:.6g} ({summary['objective']['set']}"
                  f", {tune['step']} test-time steps) after {tune['steps']} training iterations.\n"
                  f"# Searched: {', '.join(f'{d.key} {d.describe()}' for d in tune['dims'])}.\n"
                  f"# Chosen: {', '.join(f'{k} = {v!r}' for k, v in best.params.items())}. Full budget: "
                  f"outer.steps = {cfg['outer']['steps']}.\n#   metaprox train best.toml --out RUN_DIR\n")
        atomic_write(out / "best.toml", header + toml_dumps(best_cfg))
    atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary
