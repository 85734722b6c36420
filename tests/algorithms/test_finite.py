"""FiniteMMP against closed forms: the regularized multi-task optimum (Evgeniou & Pontil 2004) of linear
least-squares tasks — flat with per-task λ_t, a two-level tree, a graph — and the shared/private limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.priors import Graph, Tree
from metaprox.prox import GroupL2, RobustL2
from metaprox.tasks.taskset import TaskSampler, TaskSet, task_lam_factors

DT = torch.float64


def tasks_of_sizes(sizes=(6, 9, 15, 30, 12), d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, 1, generator=g, dtype=DT)
    out = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, d, generator=g, dtype=DT)
        w = base + 0.7 * torch.randn(d, 1, generator=g, dtype=DT)
        out.append(metaprox.Task(x, x @ w + 0.5 * i + 0.1 * torch.randn(n, 1, generator=g, dtype=DT), name=f"t{i}"))
    return TaskSet(out)


def model(d=3):
    torch.manual_seed(1)
    return torch.nn.Linear(d, 1).to(DT)


def quad(task):
    """L(θ) = ½θᵀAθ − bᵀθ + const, θ = [weight, bias], mean squared error."""
    xa = torch.cat([task.x, torch.ones(task.num_examples, 1, dtype=DT)], 1)
    n = task.num_examples
    return 2.0 / n * xa.T @ xa, 2.0 / n * (xa.T @ task.y).flatten()


class Quadratic:
    """Assemble ∇J = Hx − r = 0 for J = Σ quadratic data terms + Σ k/2‖x_i − x_j‖²_Λ over variable blocks."""

    def __init__(self, blocks: int, p: int):
        self.p = p
        self.h = torch.zeros(blocks * p, blocks * p, dtype=DT)
        self.r = torch.zeros(blocks * p, dtype=DT)

    def sl(self, i):
        return slice(i * self.p, (i + 1) * self.p)

    def data(self, i, weight, a, b):
        self.h[self.sl(i), self.sl(i)] += weight * a
        self.r[self.sl(i)] += weight * b

    def couple(self, i, j, k, lam_entries):
        dg = torch.diag(k * lam_entries)
        for u, w_ in ((i, j), (j, i)):
            self.h[self.sl(u), self.sl(u)] += dg
            self.h[self.sl(u), self.sl(w_)] -= dg

    def solve(self):
        return torch.linalg.solve(self.h, self.r).view(-1, self.p)


def run(fm, steps):
    for _ in range(steps):
        fm.step(monitor=False)


def test_flat_per_task_lambda_reaches_joint_optimum():
    ts = tasks_of_sizes()
    lam, p = 0.8, 4
    s = task_lam_factors(ts.sizes, "size")
    q = Quadratic(len(ts) + 1, p)
    for t in range(len(ts)):
        q.data(t, 1.0, *quad(ts[t]))
        q.couple(t, len(ts), float(s[t]), torch.full((p,), lam, dtype=DT))
    want = q.solve()
    fm = FiniteMMP(model(), ts, lam=lam, task_lam="size", inner=metaprox.ExactLeastSquares(), center_update="exact")
    j0 = fm.objective()
    run(fm, 300)
    assert fm.objective() < j0
    assert torch.allclose(fm.rows(np.arange(len(ts))), want[:-1], atol=1e-8)
    assert torch.allclose(fm.w_row(), want[-1], atol=1e-8)
    # the paper's gradient rule with outer lr 1/(λ Σ â_t s_t) is the same block step
    fm2 = FiniteMMP(model(), ts, lam=lam, task_lam="size", inner=metaprox.ExactLeastSquares(),
                    outer_lr=1.0 / (lam * float(s.mean())))
    run(fm2, 300)
    assert torch.allclose(fm2.w_row(), want[-1], atol=1e-8)
    # the reported objective is J at the optimum
    jstar = sum(float(fm.tasks[t].y.sub(fm.predict_task(t, fm.tasks[t].x)).square().mean())
                + 0.5 * lam * float(s[t]) * float((want[t] - want[-1]).square().sum()) for t in range(len(ts)))
    assert fm.objective() == pytest.approx(jstar, rel=1e-9)


def test_sgd_inner_and_task_weights_minibatches():
    ts = TaskSet(list(tasks_of_sizes(sizes=(10,) * 5).tasks), weights=[1.0, 2.0, 0.5, 1.0, 3.0])
    lam, p = 1.5, 4
    q = Quadratic(len(ts) + 1, p)
    for t in range(len(ts)):
        q.data(t, float(ts.weights[t]), *quad(ts[t]))
        q.couple(t, len(ts), float(ts.weights[t]), torch.full((p,), lam, dtype=DT))
    want = q.solve()
    fm = FiniteMMP(model(), ts, lam=lam, inner=metaprox.SGD(lr=0.1, steps=20), center_update="exact",
                   sampler=TaskSampler(len(ts), batch_size=2, seed=3))
    run(fm, 300)
    assert torch.allclose(fm.rows(np.arange(len(ts))), want[:-1], atol=1e-5)
    assert torch.allclose(fm.w_row(), want[-1], atol=1e-5)


def test_two_level_tree_reaches_joint_optimum():
    ts = tasks_of_sizes(sizes=(6, 9, 15, 30, 12, 8))
    groups = ["a", "a", "a", "b", "b", "c"]
    lam, levels, p = 2.0, [0.7], 4
    tree = Tree({"root": None, "a": "root", "b": "root", "c": "root"}, groups, levels)
    n = len(ts)
    node = {"root": n, "a": n + 1, "b": n + 2, "c": n + 3}
    q = Quadratic(n + 4, p)
    ones = torch.ones(p, dtype=DT)
    for t in range(n):
        q.data(t, 1.0, *quad(ts[t]))
        q.couple(t, node[groups[t]], lam, ones)
    for grp in "abc":
        q.couple(node[grp], n, groups.count(grp) * levels[0], ones)
    want = q.solve()
    fm = FiniteMMP(model(), ts, lam=lam, inner=metaprox.ExactLeastSquares(), center_update="exact", prior=tree)
    run(fm, 400)
    assert torch.allclose(fm.rows(np.arange(n)), want[:n], atol=1e-7)
    assert torch.allclose(fm.w_row(), want[n], atol=1e-7)
    assert torch.allclose(fm.theta[tree.index["b"]], want[node["b"]], atol=1e-7)


def test_graph_coupling_reaches_joint_optimum():
    ts = tasks_of_sizes()
    edges = [(0, 1, 2.0), (1, 2, 0.5), (3, 4, 1.0), (0, 4, 0.3)]
    lam, p = 0.6, 4
    n = len(ts)
    q = Quadratic(n + 1, p)
    le = torch.full((p,), lam, dtype=DT)
    for t in range(n):
        q.data(t, 1.0, *quad(ts[t]))
        q.couple(t, n, 1.0, le)
    for t, s_, e in edges:
        q.couple(t, s_, e, le)
    want = q.solve()
    fm = FiniteMMP(model(), ts, lam=lam, inner=metaprox.ExactLeastSquares(), center_update="exact",
                   graph=Graph(n, edges))
    j0 = fm.objective()
    run(fm, 400)
    assert fm.objective() < j0
    assert torch.allclose(fm.rows(np.arange(n)), want[:n], atol=1e-7)
    assert torch.allclose(fm.w_row(), want[n], atol=1e-7)


def test_private_limit_is_independent_training():
    ts = tasks_of_sizes(sizes=(12,) * 5)
    fm = FiniteMMP(model(), ts, lam="private", inner=metaprox.SGD(lr=0.2, steps=1500, momentum=0.5))
    w0 = fm.w_row().clone()
    fm.step()
    for t in range(len(ts)):
        xa = torch.cat([ts[t].x, torch.ones(ts[t].num_examples, 1, dtype=DT)], 1)
        sol = torch.linalg.lstsq(xa, ts[t].y).solution.flatten()
        assert torch.allclose(fm.rows([t])[0], sol, atol=1e-6)
    assert torch.equal(fm.w_row(), w0)  # private groups are never averaged into w


def test_shared_limit_is_joint_training():
    ts = tasks_of_sizes(sizes=(12,) * 5)
    # everything shared: one step is a gradient step on the pooled (task-weighted) loss
    fm = FiniteMMP(model(), ts, lam="shared", inner=metaprox.SGD(lr=0.1, steps=5), outer_lr=0.3)
    w = fm.w_row().clone()
    grads = [quad(ts[t])[0] @ w - quad(ts[t])[1] for t in range(len(ts))]
    fm.step()
    assert torch.allclose(fm.w_row(), w - 0.3 * torch.stack(grads).mean(0), atol=1e-12)
    assert torch.allclose(fm.rows([2])[0], fm.w_row() * 0 + w)  # the solver never moved the tied v_t

    # shared weight + private bias: converges to joint least squares with per-task intercepts
    fm = FiniteMMP(model(), ts, lam={"weight": "shared", "bias": "private"},
                   inner=metaprox.SGD(lr=0.3, steps=60), outer_lr=0.8)
    for _ in range(200):
        fm.step(monitor=False)
    n = len(ts)
    rows = []
    for t in range(n):
        nt = ts[t].num_examples
        onehot = torch.zeros(nt, n, dtype=DT)
        onehot[:, t] = 1.0
        rows.append(torch.cat([ts[t].x, onehot], 1) / nt ** 0.5)
    a = torch.cat(rows)
    b = torch.cat([ts[t].y / ts[t].num_examples ** 0.5 for t in range(n)])
    sol = torch.linalg.lstsq(a, b).solution.flatten()
    assert torch.allclose(fm.w_row()[:3], sol[:3], atol=1e-6)
    assert torch.allclose(fm.rows(np.arange(n))[:, 3], sol[3:], atol=1e-6)
    assert torch.allclose(fm.rows(np.arange(n))[:, :3], fm.w_row()[:3].expand(n, 3))


def test_soft_and_named_groups_mix():
    pen = GroupL2({"weight": 2.0, "bias": "private"}, ["weight", "bias"])
    assert pen.group_lams == [2.0, 0.0] and pen.private == [False, True]
    with pytest.raises(ValueError, match="shared"):
        GroupL2("tied", ["w"])
    with pytest.raises(ValueError):
        GroupL2(-1.0, ["w"])


def test_robust_prox_learner_runs_and_bounds_outlier_pull():
    ts = tasks_of_sizes(sizes=(10,) * 5)
    outlier = metaprox.Task(ts[0].x, ts[0].y + 100.0, name="outlier")
    ts2 = TaskSet(list(ts.tasks) + [outlier])
    plain = FiniteMMP(model(), ts2, lam=1.0, inner=metaprox.SGD(lr=0.1, steps=60), outer_lr=0.5)
    robust = FiniteMMP(model(), ts2, lam=RobustL2(1.0, ["weight", "bias"]), inner=metaprox.SGD(lr=0.1, steps=60),
                       outer_lr=0.5)
    for _ in range(20):
        plain.step(monitor=False)
        robust.step(monitor=False)
    clean = FiniteMMP(model(), ts, lam=1.0, inner=metaprox.SGD(lr=0.1, steps=60), outer_lr=0.5)
    for _ in range(20):
        clean.step(monitor=False)
    # the outlier drags the plain prior's bias far more than the robust one's
    assert abs(float(robust.w_row()[3] - clean.w_row()[3])) < 0.5 * abs(float(plain.w_row()[3] - clean.w_row()[3]))


def test_minibatch_step_touches_only_its_tasks():
    ts = tasks_of_sizes()
    fm = FiniteMMP(model(), ts, lam=1.0, inner=metaprox.ExactLeastSquares())
    fm.step([1, 3])
    assert fm.store.initialized(np.arange(5)).tolist() == [False, True, False, True, False]


def test_tree_centers_survive_a_checkpoint(tmp_path):
    """θ of every tree node travels with the checkpoint: resumed after 3 of 6 steps = 6 uninterrupted steps."""
    from metaprox.checkpoint import load_checkpoint, save_checkpoint

    ts = tasks_of_sizes(sizes=(6, 9, 15, 30))
    groups = ["a", "a", "b", "b"]

    def build():
        tree = Tree({"root": None, "a": "root", "b": "root"}, groups, [0.7])
        return FiniteMMP(model(), ts, lam=2.0, inner=metaprox.SGD(lr=0.05, steps=5), center_update="exact",
                         prior=tree)

    full = build()
    run(full, 6)
    first = build()
    run(first, 3)
    save_checkpoint(tmp_path, first.state_dict(), {})
    state, _ = load_checkpoint(tmp_path)
    assert not torch.equal(state["buffers"]["tree_theta"], build().theta)  # θ moved: the check below can fail
    resumed = build()
    resumed.load_state_dict(state)
    resumed.store = first.store  # the per-task rows live in the store, saved separately (metaprox.sharded)
    run(resumed, 3)
    assert torch.equal(resumed.theta, full.theta)
    assert torch.equal(resumed.w_row(), full.w_row())
    flat = FiniteMMP(model(), ts, lam=2.0, inner=metaprox.ExactLeastSquares())
    with pytest.raises(ValueError, match="Tree prior"):
        flat.load_state_dict(state)
