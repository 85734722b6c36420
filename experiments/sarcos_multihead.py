"""SARCOS inverse dynamics, 7 torques as 7 tasks on shared 21-d inputs: prox-shared MLP trunk + per-task heads.

Methods (the first three are the same :class:`~metaprox.FiniteMultiHeadMMP` machinery — same trunk
21→h→h (tanh), same per-task head Linear(h, 1), same warm-started inner Adam, same number of outer steps — they
differ only in how the trunk is coupled across tasks):

- ``independent`` trunk ``"private"`` (λ = 0): seven separate MLPs;
- ``shared``      trunk ``"shared"`` (λ = ∞): one trunk trained jointly (meta-gradient = data gradient, Adam),
                  per-task heads — hard parameter sharing;
- ``mmp``         trunk pulled toward a learned center with λ (chosen on a validation split of the training
                  rows from ``--lams``), per-task heads private; outer step 1/λ (exact center update);
- ``pooled``      a plain ``nn.Sequential`` 21→h→h→7 trained by full-batch Adam on all 7 outputs (the
                  textbook pooled multi-output model; sanity check for ``shared``, same objective).

Split: ``--train`` random rows for training (shared by all tasks), the rest for test; inputs and every target
standardised with training statistics. Metric: test nMSE (MSE / variance of the test target), averaged over
the 7 torques. Per split, on a 75/25 split of the training rows only, every method picks its number of outer
steps from ``--checkpoints`` (early stopping; ``pooled``: Adam steps / inner steps) and ``mmp`` also its λ from
``--lams``; then each is refit on all training rows with its picks. 95 % CI over splits: mean ± 1.96·sd/√splits.

    python experiments/sarcos_multihead.py --splits 5 --out reports/beyond/sarcos.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import metaprox
from metaprox.algorithms.multihead import FiniteMultiHeadMMP
from metaprox.models.shared_trunk import SharedTrunk
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSet

DT = torch.float64
PATH = "/work/shared/data/multitask/sarcos_inv_test.npz"


def trunk(d: int, h: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())


def fit_multihead(x: np.ndarray, y: np.ndarray, lam, args, seed: int, steps: int,
                  val: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[FiniteMultiHeadMMP, dict[int, float]]:
    """Fit for ``steps`` outer steps; with ``val``, also the validation nMSE at every checkpoint step."""
    xt = torch.as_tensor(x, dtype=DT)
    ts = TaskSet([Task(xt, torch.as_tensor(y[:, [j]], dtype=DT), name=f"tau{j + 1}") for j in range(y.shape[1])])
    model = SharedTrunk(trunk(x.shape[1], args.hidden, seed), {"torque": nn.Linear(args.hidden, 1)}).to(DT)
    kw: dict = {}
    if lam == "shared":
        kw["meta_optimizer"] = lambda p: torch.optim.Adam(p, lr=args.outer_adam_lr)
    elif lam != "private":
        kw["outer_lr"] = 1.0 / float(lam)
    fm = FiniteMultiHeadMMP(model, ts, ["torque"] * y.shape[1], loss="mse", lam=lam, head_init="module",
                            inner=metaprox.Adam(lr=args.inner_lr, steps=args.inner_steps), seed=seed, **kw)
    curve = {}
    for k in range(1, steps + 1):
        fm.step(monitor=False)
        if val is not None and k in args.checkpoints:
            curve[k] = float(nmse_multihead(fm, *val).mean())
    return fm, curve


def nmse_multihead(fm: FiniteMultiHeadMMP, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xt = torch.as_tensor(x, dtype=DT)
    pred = np.stack([fm.predict_task(j, xt)[:, 0].numpy() for j in range(y.shape[1])], 1)
    return ((pred - y) ** 2).mean(0) / y.var(0)


def fit_pooled(x: np.ndarray, y: np.ndarray, args, seed: int, steps: int,
               val: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[nn.Module, dict[int, float]]:
    net = nn.Sequential(trunk(x.shape[1], args.hidden, seed), nn.Linear(args.hidden, y.shape[1])).to(DT)
    opt = torch.optim.Adam(net.parameters(), lr=args.inner_lr)
    xt, yt = torch.as_tensor(x, dtype=DT), torch.as_tensor(y, dtype=DT)
    curve = {}
    for k in range(1, steps * args.inner_steps + 1):
        opt.zero_grad()
        loss = (net(xt) - yt).square().mean()
        loss.backward()
        opt.step()
        if val is not None and k % args.inner_steps == 0 and k // args.inner_steps in args.checkpoints:
            curve[k // args.inner_steps] = float(nmse_pooled(net, *val).mean())
    return net, curve


def nmse_pooled(net: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        pred = net(torch.as_tensor(x, dtype=DT)).numpy()
    return ((pred - y) ** 2).mean(0) / y.var(0)


def standardise(tr: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = tr.mean(0), tr.std(0) + 1e-12
    return [(a - mu) / sd for a in (tr, *others)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 25, 50, 100, 150],
                    help="candidate numbers of outer steps (early stopping chosen on validation, every method)")
    ap.add_argument("--outer-adam-lr", type=float, default=0.01)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = np.load(PATH)
    X, Y = d["X"].astype(np.float64), d["Y"].astype(np.float64)
    t0 = time.time()
    res: dict[str, list[float]] = {m: [] for m in ("independent", "shared", "mmp", "pooled")}
    per_task: dict[str, list[list[float]]] = {m: [] for m in res}
    chosen = []
    for split in range(args.splits):
        rng = np.random.default_rng(split)
        perm = rng.permutation(len(X))
        tr, te = perm[:args.train], perm[args.train:]
        # λ on training rows only: 75/25 split of the training rows
        n_fit = int(0.75 * len(tr))
        xf, xv = standardise(X[tr[:n_fit]], X[tr[n_fit:]])
        yf, yv = standardise(Y[tr[:n_fit]], Y[tr[n_fit:]])
        # every method picks its number of outer steps (and mmp its λ) on the validation rows
        last = max(args.checkpoints)
        cands = {"independent": ["private"], "shared": ["shared"], "mmp": list(args.lams)}
        pick = {}
        for m, lams in cands.items():
            best = min((c[k], lam, k) for lam in lams
                        for c in [fit_multihead(xf, yf, lam, args, split, last, (xv, yv))[1]] for k in c)
            pick[m] = best
        cp = fit_pooled(xf, yf, args, split, last, (xv, yv))[1]
        pick["pooled"] = min((v, None, k) for k, v in cp.items())
        chosen.append({m: [p[1], p[2]] for m, p in pick.items()})
        xtr, xte = standardise(X[tr], X[te])
        ytr, yte = standardise(Y[tr], Y[te])
        scores = {m: nmse_multihead(fit_multihead(xtr, ytr, pick[m][1], args, split, pick[m][2])[0], xte, yte)
                  for m in cands}
        scores["pooled"] = nmse_pooled(fit_pooled(xtr, ytr, args, split, pick["pooled"][2])[0], xte, yte)
        for m, s in scores.items():
            res[m].append(float(s.mean()))
            per_task[m].append([float(v) for v in s])
        print(f"split {split}: picks {chosen[-1]} " + " ".join(f"{m}={res[m][-1]:.4f}" for m in res),
              f"[{time.time() - t0:.0f}s]", flush=True)
    summary = {m: metaprox.mean_ci(v) for m, v in res.items()}
    for m, (mean, ci) in summary.items():
        print(f"{m:12s} nMSE {mean:.4f} ± {ci:.4f}")
    out = {"args": vars(args), "chosen_lam": chosen, "nmse": res, "nmse_per_task": per_task,
           "summary": {m: {"mean": a, "ci95": b} for m, (a, b) in summary.items()},
           "seconds": time.time() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
