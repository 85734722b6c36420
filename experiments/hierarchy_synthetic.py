"""Flat vs hierarchical prior on tasks from a genuinely hierarchical generative model (synthetic, infinite setting).

World (per seed): root θ₀ ~ N(0, I) over (weights, bias) of a linear model on ``--dim`` features; group centers
θ_g = θ₀ + ``--group-scale``·z; task parameters θ_t = θ_g + ``--task-scale``·z; data y = x·w_t + b_t + noise
(``--noise``), x ~ N(0, I), ``--shots`` support and ``--queries`` query rows. ``--groups`` training groups;
separate validation-only and test-only groups stand for unseen groups.

Training (both learners, the same budget): ``--steps`` outer steps, each on ``--meta-batch`` fresh tasks of
training groups drawn uniformly; exact inner solves (ridge toward the center); plain SGD outer step with the
paper's linear decay. Flat: :class:`metaprox.MetaMinibatchProx`, adapts every task from w with λ.
Hierarchical: :class:`metaprox.HierarchicalMMP` (tasks → group centers → root); a task of a seen group is
adapted from its group's center with λ, of an unseen group from w with the marginal pull λλ_g/(λ + λ_g).

Selection on validation only, per learner and per seed, over grids of the same size (``--grid`` configurations
each): flat over λ × ηλ, hierarchical over λ × λ_group × ηλ (ηλ is the fraction of the way the outer step
moves: root lr ηλ/λ (flat) or ηλ/λ_group; group lr ηλ·G/(λ + λ_group), G groups ≈ 1/mass of a group in a
step). Criterion: mean query MSE over new tasks of seen groups and tasks of the validation groups. Test: query
MSE on new tasks of seen groups and tasks of the test groups, 95 % CIs over test tasks pooled over seeds, and
the paired difference (same test tasks). Reference: the Bayes posterior mean with the true centers and scales
(what no learner can beat on average).

    OMP_NUM_THREADS=1 python experiments/hierarchy_synthetic.py --out reports/beyond/hierarchy_synthetic.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

import metaprox
from metaprox.checkpoint import atomic_write

DT = torch.float64


class World:
    """Root, training / validation / test group centers of one seed; draws tasks of a given center."""

    def __init__(self, args, seed: int):
        self.args, self.gen = args, torch.Generator().manual_seed(seed)
        p = args.dim + 1
        self.root = torch.randn(p, generator=self.gen, dtype=DT)
        self.centers = {kind: self.root + args.group_scale * torch.randn(n, p, generator=self.gen, dtype=DT)
                        for kind, n in (("train", args.groups), ("val", args.groups), ("test", args.test_groups))}

    def task(self, center: torch.Tensor, gen: torch.Generator | None = None) -> metaprox.Task:
        a, gen = self.args, gen or self.gen
        theta = center + a.task_scale * torch.randn(center.numel(), generator=gen, dtype=DT)
        x = torch.randn(a.shots + a.queries, a.dim, generator=gen, dtype=DT)
        y = x @ theta[:-1].view(-1, 1) + theta[-1] + a.noise * torch.randn(len(x), 1, generator=gen, dtype=DT)
        return metaprox.Task(x[: a.shots], y[: a.shots], x[a.shots:], y[a.shots:])

    def tasks(self, kind: str, num: int) -> tuple[list[metaprox.Task], list[str], list[int]]:
        """``num`` tasks of groups of ``kind``, round robin: tasks, group names, group indices."""
        idx = [i % len(self.centers[kind]) for i in range(num)]
        return [self.task(self.centers[kind][i]) for i in idx], [f"{kind}{i}" for i in idx], idx


def build(kind: str, cfg: dict, args):
    torch.manual_seed(0)
    model = torch.nn.Linear(args.dim, 1).to(DT)
    common = dict(inner=metaprox.ExactLeastSquares(), total_steps=args.steps)
    if kind == "flat":
        return metaprox.MetaMinibatchProx(model, "mse", lam=cfg["lam"], outer_lr=cfg["interp"] / cfg["lam"], **common)
    return metaprox.HierarchicalMMP(model, "mse", lam=cfg["lam"], lam_group=cfg["lam_group"],
                                    outer_lr=cfg["interp"] / cfg["lam_group"],
                                    group_lr=cfg["interp"] * args.groups / (cfg["lam"] + cfg["lam_group"]), **common)


def train(kind: str, cfg: dict, world: World, seed: int, args):
    ln = build(kind, cfg, args)
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same training tasks for every configuration
    for _ in range(args.steps):
        picks = torch.randint(args.groups, (args.meta_batch,), generator=gen).tolist()
        tasks = [world.task(world.centers["train"][i], gen) for i in picks]
        if kind == "flat":
            ln.step(tasks, monitor=False)
        else:
            ln.step(tasks, where=[f"train{i}" for i in picks], monitor=False)
    return ln


def query_mse(ln, kind: str, tasks, names) -> np.ndarray:
    out = []
    for t, g in zip(tasks, names):
        p = ln.adapt(t) if kind == "flat" else ln.adapt(t, where=g)
        with torch.no_grad():
            out.append(float((ln.predict(p, t.x_query) - t.y_query).square().mean()))
    return np.array(out)


def bayes_mse(tasks, centers: torch.Tensor, idx, task_var: float, args) -> np.ndarray:
    """Posterior mean of θ_t given the support set, prior N(center, task_var·I), known noise."""
    out = []
    for t, i in zip(tasks, idx):
        xa = torch.cat([t.x, torch.ones(len(t.x), 1, dtype=DT)], 1)
        prec = xa.T @ xa / args.noise ** 2 + torch.eye(xa.shape[1], dtype=DT) / task_var
        theta = torch.linalg.solve(prec, xa.T @ t.y.flatten() / args.noise ** 2 + centers[i] / task_var)
        xq = torch.cat([t.x_query, torch.ones(len(t.x_query), 1, dtype=DT)], 1)
        out.append(float((xq @ theta - t.y_query.flatten()).square().mean()))
    return np.array(out)


def grids(args) -> dict[str, list[dict]]:
    """Two grids of the same size: the flat λ grid is as fine as the hierarchy's λ × λ_group grid is large."""
    flat_lams = np.geomspace(args.lam_range[0], args.lam_range[1], len(args.lams) * len(args.lam_groups))
    return {"flat": [dict(lam=float(lam), interp=i) for lam, i in itertools.product(flat_lams, args.interps)],
            "hierarchical": [dict(lam=lam, lam_group=lg, interp=i)
                             for lam, lg, i in itertools.product(args.lams, args.lam_groups, args.interps)]}


def summary(values: np.ndarray) -> list[float]:
    m, ci = metaprox.mean_ci(values)
    return [round(m, 5), round(ci, 5)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--group-scale", type=float, default=1.5)
    ap.add_argument("--task-scale", type=float, default=0.3)
    ap.add_argument("--groups", type=int, default=10, help="training groups (as many validation-only groups)")
    ap.add_argument("--test-groups", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=10)
    ap.add_argument("--val-tasks", type=int, default=100, help="per kind (seen / unseen groups)")
    ap.add_argument("--test-tasks", type=int, default=200, help="per kind and seed")
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.4, 1.6, 6.4])
    ap.add_argument("--lam-groups", type=float, nargs="+", default=[0.02, 0.06, 0.2])
    ap.add_argument("--lam-range", type=float, nargs=2, default=[0.01, 6.4], help="flat λ grid, geometric")
    ap.add_argument("--interps", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start, grid = time.time(), grids(args)
    runs, pooled = [], {k: {"seen": [], "unseen": []} for k in ("flat", "hierarchical", "bayes")}
    for seed in args.seeds:
        world = World(args, seed)
        val = {"seen": world.tasks("train", args.val_tasks), "unseen": world.tasks("val", args.val_tasks)}
        test = {"seen": world.tasks("train", args.test_tasks), "unseen": world.tasks("test", args.test_tasks)}
        run = {"seed": seed, "chosen": {}, "validation": {}, "test": {}}
        for kind, configs in grid.items():
            scores = []
            for cfg in configs:
                ln = train(kind, cfg, world, seed, args)
                scores.append(float(np.mean([query_mse(ln, kind, *val[s][:2]).mean() for s in val])))
            best = configs[int(np.argmin(scores))]
            ln = train(kind, best, world, seed, args)
            run["chosen"][kind], run["validation"][kind] = best, min(scores)
            for s in test:
                mse = query_mse(ln, kind, *test[s][:2])
                pooled[kind][s].append(mse)
                run["test"][f"{kind}_{s}"] = summary(mse)
        # seen group: prior N(θ_g, σ_t²); unseen group: its center is unknown, N(θ₀, σ_g² + σ_t²)
        unseen_centers = world.root.expand(args.test_groups, -1)
        for s, centers, var in (("seen", world.centers["train"], args.task_scale ** 2),
                                ("unseen", unseen_centers, args.group_scale ** 2 + args.task_scale ** 2)):
            mse = bayes_mse(test[s][0], centers, test[s][2], var, args)
            pooled["bayes"][s].append(mse)
            run["test"][f"bayes_{s}"] = summary(mse)
        runs.append(run)
        print(f"seed {seed}: chosen {run['chosen']}; test {run['test']} ({time.time() - start:.0f} s)", flush=True)
    result = {"args": vars(args), "grid_size": {k: len(v) for k, v in grid.items()}, "runs": runs,
              "test_pooled": {k: {s: summary(np.concatenate(v)) for s, v in d.items()} for k, d in pooled.items()},
              "hierarchical_minus_flat": {s: summary(np.concatenate(pooled["hierarchical"][s])
                                                     - np.concatenate(pooled["flat"][s])) for s in ("seen", "unseen")},
              "seconds": round(time.time() - start, 1)}
    print(json.dumps({k: result[k] for k in ("test_pooled", "hierarchical_minus_flat", "seconds")}, indent=1))
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
