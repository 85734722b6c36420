"""Finite MMP on classic multi-task tabular sets vs independent per-task models vs one pooled model.

All four methods are the same FiniteMMP machinery with a linear model (logistic for landmine):

- ``pooled``      one model on all training rows (one task), ridge toward 0 on the weights;
- ``independent`` one model per task, ridge toward 0 on the weights (``center_update="fixed"``, w = 0);
- ``mmp``         per-task weights pulled toward a learned center with one λ, per-task bias private
                  (partial sharing; like-for-like with ``independent``, whose bias is free too);
- ``mmp_size``    the same with size-scaled pull λ_t = λ·n̄/n_t (more data → weaker pull);
- ``mmp_all``     weights *and* bias pulled toward the learned center (the plain paper penalty);
- ``mmp_tree``    landmine only (``--methods``): ``mmp`` with a two-level prior root → {foliated fields 1–15,
                  bare-earth/desert fields 16–29} → fields (the two terrain types of Xue et al. 2007): each
                  field's weights are pulled toward its terrain's center with λ, each terrain center toward the
                  root with λ_group; (λ, λ_group) chosen jointly on the same validation rows (``--group-lams``).

λ of every method is chosen per split on the *training* rows only (a random 25 % of each task's training rows
held out, grid below), then the model is refit on all training rows. Splits: landmine and Parkinson's — a
random ``--train-frac`` of each task's rows for training, the rest for test; computer survey — the fixed
protocol (profiles 1–16 train, 17–20 test), the split only changes the validation rows used to choose λ.
Landmine (logistic, iterative inner solver): training rows per task are rounded down to a multiple of 16
(``--bucket``) so that tasks fall into a few equal-size batches; the dropped rows are unused (not tested on).
Metrics: landmine — mean per-task AUC; survey and Parkinson's — RMSE over all test rows. 95 % CI over
splits: mean ± 1.96·sd/√splits.

    python experiments/tabular_multitask.py --dataset parkinsons --splits 10
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.data.multitask import load_computer_survey, load_landmine, load_parkinsons, split_per_task
from metaprox.metrics import auc
from metaprox.priors import Tree
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSet

METHODS = ("pooled", "independent", "mmp", "mmp_size", "mmp_all", "mmp_tree")
LANDMINE_TERRAIN = ["foliated"] * 15 + ["bare"] * 14  # fields 1–15 highly foliated, 16–29 bare earth/desert
DT = torch.float64


def fit(method: str, tasks: list[Task], lam: float, classify: bool,
        group_lam: float | None = None) -> list[dict[str, torch.Tensor]]:
    """Per-task parameters after fitting ``method`` with pull/ridge ``lam`` (``mmp_tree``: and ``group_lam``)."""
    d = tasks[0].x.shape[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 2 if classify else 1).to(DT)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    if method == "pooled":
        ts = TaskSet([Task(torch.cat([t.x for t in tasks]), torch.cat([t.y for t in tasks]))])
    else:
        ts = TaskSet(tasks)
    coupled = method.startswith("mmp")
    lam_spec = lam if method == "mmp_all" else {"weight": lam, "bias": "private"}
    loss = "cross_entropy" if classify else "mse"
    if classify:
        inner = metaprox.SGD(lr=0.4 / (1.0 + lam * float(ts.sizes.mean() / ts.sizes.min())), steps=20,
                             momentum=0.8)
        outer = 30
    else:
        inner = metaprox.ExactLeastSquares()
        outer = 1 if not coupled else 150
    prior = None
    if method == "mmp_tree":
        if len(tasks) != len(LANDMINE_TERRAIN):
            raise ValueError("mmp_tree knows the terrain groups of landmine's 29 fields only.")
        prior = Tree({"root": None, "foliated": "root", "bare": "root"}, LANDMINE_TERRAIN, [group_lam])
    fm = FiniteMMP(model, ts, loss, lam=lam_spec, task_lam="size" if method == "mmp_size" else "constant",
                   inner=inner, center_update="exact" if coupled else "fixed", prior=prior)
    prev = None
    for _ in range(outer):
        fm.step(monitor=False)
        if not classify and coupled:  # alternating minimisation: stop when the center has settled
            w = fm.w_row()
            if prev is not None and float((w - prev).norm()) < 1e-6 * (1 + float(w.norm())):
                break
            prev = w.clone()
    params = [fm.task_params(i) for i in range(len(ts))]
    return params * len(tasks) if method == "pooled" else params


def predict(params: dict[str, torch.Tensor], x: torch.Tensor, classify: bool) -> np.ndarray:
    out = x @ params["weight"].T + params["bias"]
    return (out[:, 1] - out[:, 0]).numpy() if classify else out[:, 0].numpy()


def score(params: list[dict[str, torch.Tensor]], tasks: list[Task], classify: bool) -> float:
    """Mean per-task AUC (classification) or RMSE over all rows (regression)."""
    if classify:
        vals = [auc(predict(p, t.x, True), t.y.numpy()) for p, t in zip(params, tasks)]
        return float(np.nanmean(vals))
    se = np.concatenate([(predict(p, t.x, False) - t.y[:, 0].numpy()) ** 2 for p, t in zip(params, tasks)])
    return float(np.sqrt(se.mean()))


def make_tasks(data, rows, mean, std, classify):
    return data.tasks(rows, y_dtype=torch.int64 if classify else DT, mean=mean, std=std)


def bucket(mask: np.ndarray, task: np.ndarray, q: int, rng: np.random.Generator) -> np.ndarray:
    """Drop random rows of ``mask`` so that every task keeps a multiple of ``q`` rows (≥ q): tasks of equal
    size are solved as one batch, so a few size buckets make the iterative (logistic) fits much faster."""
    if q <= 1:
        return mask
    out = mask.copy()
    for t in np.unique(task):
        rows = np.flatnonzero(mask & (task == t))
        extra = len(rows) % q if len(rows) >= q else 0
        out[rng.choice(rows, size=extra, replace=False)] = False
    return out


def run_split(data, train: np.ndarray, test: np.ndarray, rng: np.random.Generator, classify: bool,
              grid: list[float], q: int = 1, methods: tuple[str, ...] = METHODS,
              group_grid: tuple[float, ...] = ()) -> dict[str, dict[str, float]]:
    mean, std = data.x[train].mean(0), data.x[train].std(0) + 1e-12
    sub = np.zeros(len(data.y), dtype=bool)
    tr_idx = np.flatnonzero(train)
    sub[tr_idx[split_per_task(data.task[tr_idx], 0.75, rng)]] = True
    val = train & ~sub
    sub, train = bucket(sub, data.task, q, rng), bucket(train, data.task, q, rng)
    fit_tasks, val_tasks = make_tasks(data, sub, mean, std, classify), make_tasks(data, val, mean, std, classify)
    train_tasks, test_tasks = make_tasks(data, train, mean, std, classify), make_tasks(data, test, mean, std, classify)
    better = (lambda a, b: a > b) if classify else (lambda a, b: a < b)
    out = {}
    for method in methods:
        best_lam, best = None, None
        for lam in [(a, g) for a in grid for g in group_grid] if method == "mmp_tree" else [(a, None) for a in grid]:
            s = score(fit(method, fit_tasks, lam[0], classify, lam[1]), val_tasks, classify)
            if best is None or better(s, best):
                best_lam, best = lam, s
        out[method] = {"lam": best_lam[0], "val": best,
                       "test": score(fit(method, train_tasks, best_lam[0], classify, best_lam[1]), test_tasks,
                                     classify)}
        if method == "mmp_tree":
            out[method]["group_lam"] = best_lam[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["landmine", "survey", "parkinsons"], required=True)
    ap.add_argument("--data", default="/work/shared/data/multitask")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--train-frac", type=float, default=0.2)
    ap.add_argument("--target", default="total_UPDRS", help="Parkinson's target column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bucket", type=int, default=None,
                    help="round training rows per task down to a multiple of this (default: 16 for landmine, "
                         "1 otherwise); the dropped rows are not used at all")
    ap.add_argument("--lams", type=float, nargs="+", default=None,
                    help="λ grid for every method (default: the dataset's grid below)")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "mmp_tree"], choices=METHODS)
    ap.add_argument("--group-lams", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                    help="λ_group grid of mmp_tree (terrain center → root)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    classify = args.dataset == "landmine"
    if args.dataset == "landmine":
        data, grid = load_landmine(args.data), [1e-3, 1e-2, 1e-1, 1.0]
    elif args.dataset == "survey":
        data, grid = load_computer_survey(args.data), [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
    else:
        data, grid = load_parkinsons(args.data, target=args.target), [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
    grid = args.lams or grid
    args.bucket = args.bucket or (16 if classify else 1)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    results = []
    for k in range(args.splits):
        if args.dataset == "survey":
            train = data.extra["profile"] <= 16
        else:
            train = split_per_task(data.task, args.train_frac, rng)
        results.append(run_split(data, train, ~train, rng, classify, grid, args.bucket, tuple(args.methods),
                                 tuple(args.group_lams)))
        print(f"split {k}: " + ", ".join(f"{m} {r['test']:.4f} (λ={r['lam']:g})" for m, r in results[-1].items()),
              flush=True)
    summary = {}
    for m in args.methods:
        vals = np.array([r[m]["test"] for r in results])
        ci = 1.96 * vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
        summary[m] = {"mean": float(vals.mean()), "ci95": float(ci),
                      "lams": [r[m]["lam"] for r in results]}
    if "mmp_tree" in args.methods and "mmp" in args.methods:  # same splits: a paired difference
        diff = np.array([r["mmp_tree"]["test"] - r["mmp"]["test"] for r in results])
        summary["mmp_tree - mmp (paired)"] = {"mean": float(diff.mean()), "lams": [],
                                              "ci95": float(1.96 * diff.std(ddof=1) / math.sqrt(len(diff)))}
    metric = "mean per-task AUC" if classify else "RMSE"
    print(f"\n{args.dataset}: {metric} over {args.splits} splits (95% CI), {time.time() - t0:.0f}s")
    for m, s in summary.items():
        print(f"  {m:12s} {s['mean']:.4f} ± {s['ci95']:.4f}   λ chosen: {sorted(set(s['lams']))}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "metric": metric, "summary": summary,
                                              "splits": results}, indent=1))


if __name__ == "__main__":
    main()
