"""Robust prox vs plain MMP when some training tasks are outliers (synthetic linear regression).

Training: ``--tasks`` linear regression tasks θ_t = θ₀ + 0.3·z_t; a fraction ``--outliers`` of them has its
targets replaced by pure noise of scale 20 (the paper's "blank / corrupted task" situation, in miniature).
Both learners are FiniteMMP with the same inner solver (SGD, warm-started) and the paper's envelope-gradient
outer step, differing only in the penalty: SquaredL2 λ vs RobustL2 λ·log(1 + ‖v − w‖²)/2. Reported: distance
of the learned center to θ₀, and the MSE on 200 fresh clean tasks adapted from the center with the plain prox
(same λ, 10 support / 50 query rows) — mean and 95 % CI over ``--seeds`` seeds. λ is fixed (not tuned).

    python experiments/robust_outliers.py --seeds 10
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.prox import RobustL2
from metaprox.tasks.taskset import TaskSet

DT = torch.float64


def make_tasks(g, theta0, num, n, outliers=0):
    d = theta0.numel() - 1
    out = []
    for i in range(num):
        th = theta0 + 0.3 * torch.randn(d + 1, generator=g, dtype=DT)
        x = torch.randn(n, d, generator=g, dtype=DT)
        y = x @ th[:d].view(-1, 1) + th[d]
        y = y + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
        if i < outliers:
            y = 20.0 * torch.randn(n, 1, generator=g, dtype=DT)
        out.append(metaprox.Task(x, y))
    return out


def run(seed, args):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(args.features + 1, generator=g, dtype=DT)
    n_out = int(round(args.outliers * args.tasks))
    train = TaskSet(make_tasks(g, theta0, args.tasks, args.examples, n_out))
    test = [make_tasks(g, theta0, 1, 60)[0] for _ in range(200)]
    res = {}
    for name in ("plain", "robust"):
        torch.manual_seed(seed)
        model = torch.nn.Linear(args.features, 1).to(DT)
        lam = args.lam if name == "plain" else RobustL2(args.lam, ["weight", "bias"])
        fm = FiniteMMP(model, train, "mse", lam=lam, inner=metaprox.SGD(lr=0.05, steps=20), outer_lr=0.5 / args.lam)
        for _ in range(args.steps):
            fm.step(monitor=False)
        dist = float((fm.w_row() - theta0).norm())
        mmp = metaprox.MetaMinibatchProx(fm.model, "mse", lam=args.lam, inner=metaprox.ExactLeastSquares())
        mses = []
        for t in test:
            sup = metaprox.Task(t.x[:10], t.y[:10])
            p = mmp.adapt(sup)
            mses.append(float((mmp.predict(p, t.x[10:]) - t.y[10:]).square().mean()))
        res[name] = {"center_dist": dist, "test_mse": float(np.mean(mses))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--outliers", type=float, default=0.05)
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--features", type=int, default=5)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [run(s, args) for s in range(args.seeds)]
    summary = {}
    for name in ("plain", "robust"):
        for key in ("center_dist", "test_mse"):
            v = np.array([r[name][key] for r in runs])
            ci = float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))
            summary[f"{name}_{key}"] = {"mean": float(v.mean()), "ci95": ci}
    for k, s in summary.items():
        print(f"{k:22s} {s['mean']:.4f} ± {s['ci95']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
