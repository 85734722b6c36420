"""Figures of a run, labelled from the config and metrics that produced them (no hand-typed legends).

- ``plots/learning_curve.png``: φ and inner loss, the theory monitors (meta-gradient norm, per-task envelope
  gradient, inner stationarity), σ² estimate and the outer learning rate, against outer iterations.
- ``plots/sine_fits.png`` (sine runs): the paper-style picture — a test task's true curve, its K support points
  and the model after each of ``eval.steps`` test-time steps, one panel per shot setting.
- ``plots/adaptation.png``: mean test loss against test-time steps for every evaluation set.
- ``plots/val_curve.png`` (``log.eval_every`` > 0): periodic validation accuracy (classification) or loss
  against training time — the time-to-accuracy curve; with pretraining (``pretrain_curve.jsonl``) its
  validation prototype accuracy comes first, dashed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metaprox.checkpoint import atomic_write  # noqa: E402
from metaprox.rundir import read_metrics  # noqa: E402

__all__ = ["plot_run", "plot_learning_curve", "plot_sine_fits", "plot_adaptation", "plot_val_curve", "save_figure"]


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Render ``fig`` to PNG in memory, close it, and write the file atomically (no half-written PNG on a crash)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _subtitle(cfg: dict[str, Any]) -> str:
    i, o = cfg["inner"], cfg["outer"]
    mini = f" on minibatches of {i['batch_size']}" if i["batch_size"] else ""
    mini += " (carried moments)" if i.get("carry_moments") else ""
    return (f"{cfg['algorithm'].upper()} λ={cfg['prox']['lam']}, inner {i['solver']} lr={i['lr']} × {i['steps']} "
            f"steps{mini}, outer {o['optimizer']} α={o['lr']} ({o['schedule']}), meta-batch {o['meta_batch']}, "
            f"S={o['steps']}")


def plot_learning_curve(rows: list[dict[str, Any]], cfg: dict[str, Any], path: Path) -> None:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [r["phi"] for r in rows], label="mean φ_T(w) (Moreau envelope)")
    ax.plot(steps, [r["inner_loss"] for r in rows], label="mean L_T(v_T)")
    ax.set_yscale("log")
    ax.set_title("objective")
    ax = axes[1]
    ax.plot(steps, [r["meta_grad_norm"] for r in rows], label="‖λ(w − v̄)‖ meta-gradient")
    ax.plot(steps, [r["task_grad_norm"] for r in rows], label="mean ‖λ(w − v_T)‖ per task")
    ax.plot(steps, [r["inner_stationarity"] for r in rows], label="mean inner stationarity ε")
    ax.set_yscale("log")
    ax.set_title("theory monitors")
    ax = axes[2]
    ax.plot(steps, [r["sigma2"] for r in rows], label="mean ‖v_T − w‖² (σ² estimate)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="gray", ls="--", label="outer lr η_s")
    ax2.set_ylabel("outer lr")
    ax.set_title("task spread and schedule")
    for a in axes:
        a.set_xlabel("outer iteration")
        a.legend(fontsize=8)
    fig.suptitle(_subtitle(cfg), fontsize=9)
    save_figure(fig, path)


def plot_sine_fits(learner: Any, cfg: dict[str, Any], path: Path, task_index: int = 0) -> None:
    from metaprox.build import build_family, build_inner

    e = cfg["eval"]
    sets = build_family(cfg).eval_sets("test")
    inner = build_inner(cfg, lr=e["lr"], batch_size=e["batch_size"])
    lam = e["lam"] if e["lam"] is not None else cfg["prox"]["lam"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, (name, tasks) in zip(axes[0], sets.items(), strict=True):
        t = tasks[task_index]
        ax.plot(t.x_query.flatten(), t.y_query.flatten(), color="black", lw=2, label="ground truth")
        ax.scatter(t.x.flatten(), t.y.flatten(), color="red", zorder=5, label=f"{t.num_examples} support points")
        colors = plt.cm.viridis(torch.linspace(0, 0.9, len(e["steps"])).numpy())
        # steps may repeat: the ramp has a colour per listed step, so it can outnumber the distinct steps drawn
        for k, color in zip(sorted(set(e["steps"])), colors, strict=False):
            with torch.no_grad():
                params = learner.adapt(t, steps=k, lam=e["lam"], inner=inner)
                pred = learner.predict(params, t.x_query.to(learner.center()[0].device)).cpu()
            ax.plot(t.x_query.flatten(), pred.flatten(), color=color, ls="--", label=f"after {k} steps")
        ax.set_title(f"{name}: test-time {cfg['inner']['solver']} lr={inner.__dict__.get('lr')}, λ={lam}")
        ax.legend(fontsize=8)
    fig.suptitle(_subtitle(cfg), fontsize=9)
    save_figure(fig, path)


def plot_adaptation(result: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in result["sets"].items():
        xs = [i for i, v in enumerate(rows["curve"]) if v == v]  # NaN: step not evaluated
        ax.plot(xs, [rows["curve"][i] for i in xs], marker="o", ms=3, label=name)
    ax.set_xlabel("test-time steps")
    ax.set_ylabel("mean test " + ("loss" if result["metric"] != "mse" else "MSE"))
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(_subtitle(cfg), fontsize=7)
    save_figure(fig, path)


def plot_val_curve(rows: list[dict[str, Any]], cfg: dict[str, Any], path: Path,
                   pretrain_rows: list[dict[str, Any]] | None = None) -> None:
    """Validation accuracy (or loss) after each logged number of test-time steps, against training minutes.

    ``pretrain_rows`` (``pretrain_curve.jsonl``) add the pretraining phase: its validation prototype accuracy,
    drawn dashed and labelled as such (a nearest-centroid score, not the prior's adaptation).
    """
    key = "accuracy" if not rows or "accuracy" in rows[0] else "sets"
    minutes = [r["time"] / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if pretrain_rows:
        ax.plot([r["time"] / 60 for r in pretrain_rows], [100 * r["val_prototype_accuracy"] for r in pretrain_rows],
                "k--", marker=".", label="pretraining: nearest-centroid accuracy (not MMP adaptation)")
    for name in (rows[0][key] if rows else []):
        for step in rows[0][key][name]:
            vals = [100 * r[key][name][step] if key == "accuracy" else r[key][name][step] for r in rows]
            ax.plot(minutes, vals, marker=".", label=f"{name}, {step} steps")
    ax.set_xlabel("training time (min, validation excluded)")
    ax.set_ylabel("validation accuracy (%)" if key == "accuracy" else "validation query loss")
    ax.set_title(f"{cfg['name']}: {cfg['log']['eval_tasks']} validation tasks per set\n{_subtitle(cfg)}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_run(run_dir: str | Path, learner: Any = None, cfg: dict[str, Any] | None = None) -> list[Path]:
    """Write all figures of a run into ``run_dir/plots``; returns their paths."""
    from metaprox.rundir import load_learner

    run_dir = Path(run_dir)
    if learner is None or cfg is None:
        learner, cfg, _ = load_learner(run_dir)
    out = []
    rows = read_metrics(run_dir)
    if rows:
        out.append(run_dir / "plots" / "learning_curve.png")
        plot_learning_curve(rows, cfg, out[-1])
    if cfg["task"]["family"] == "sine":
        out.append(run_dir / "plots" / "sine_fits.png")
        plot_sine_fits(learner, cfg, out[-1])
    val_rows = read_metrics(run_dir, "val_curve.jsonl")
    pretrain_rows = read_metrics(run_dir, "pretrain_curve.jsonl")
    if val_rows or pretrain_rows:
        out.append(run_dir / "plots" / "val_curve.png")
        plot_val_curve(val_rows, cfg, out[-1], pretrain_rows)
    evals = [run_dir / "eval.json", *sorted(run_dir.glob("eval-bn_*.json"))]  # test results, any BN protocol
    found = [e for e in evals if e.is_file()]
    if found:
        out.append(run_dir / "plots" / "adaptation.png")
        plot_adaptation(json.loads(found[0].read_text()), cfg, out[-1])
    return out
