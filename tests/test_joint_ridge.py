"""The exact joint optimum of linear least-squares tasks (metaprox.joint_ridge) against the full joint system,
solved independently from the autograd Hessian of J written out plainly; per-task λ_t, task weights, private
entries and two outputs."""

from __future__ import annotations

import pytest
import torch

from metaprox import ExactLeastSquares
from metaprox.algorithms.finite import FiniteMMP
from metaprox.joint_ridge import JointQuadratic, applies_to, apply_to, reduced_gap, solve_joint
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSet

D, K = 3, 2
SIZES = [4, 7, 12, 5, 30, 9]


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) * 2 + 1 for n in SIZES]
    ys = [x @ torch.randn(D, K, generator=g, dtype=torch.float64) + torch.randn(n, K, generator=g,
                                                                                 dtype=torch.float64)
          for x, n in zip(xs, SIZES, strict=True)]
    s = torch.rand(len(SIZES), generator=g, dtype=torch.float64) * 3 + 0.2   # per-task pull factors λ_t/λ
    w = torch.rand(len(SIZES), generator=g, dtype=torch.float64) + 0.5       # task weights
    # weight row 0 pulled with 2, row 1 with 0.3; bias of output 0 private, of output 1 pulled with 5
    lam = torch.tensor([2.0] * D + [0.3] * D + [0.0, 5.0], dtype=torch.float64)
    return xs, ys, s, w, lam


def joint_objective(center, rows, xs, ys, s, w, lam):
    """J written out from its definition (no H_t, b_t)."""
    total = 0.0
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        W, b = rows[t, :K * D].view(K, D), rows[t, K * D:]
        total = total + w[t] * (((x @ W.T + b) - y).square().mean() + 0.5 * s[t] * (lam * (rows[t] - center)
                                                                                   .square()).sum())
    return total


def test_reduced_solve_matches_the_full_joint_system():
    xs, ys, s, w, lam = problem()
    n, P = len(xs), K * (D + 1)
    pulled = lam > 0
    m = int(pulled.sum())

    def J(theta):
        center = torch.zeros(P, dtype=torch.float64).masked_scatter(pulled, theta[:m])
        return joint_objective(center, theta[m:].view(n, P), xs, ys, s, w, lam)

    zero = torch.zeros(m + n * P, dtype=torch.float64)
    H = torch.autograd.functional.hessian(J, zero)
    g0 = torch.autograd.functional.jacobian(J, zero)
    theta = torch.linalg.solve(H, -g0)  # J is quadratic: one Newton step from 0 is the optimum
    sol = solve_joint(JointQuadratic.of_tasks(xs, ys, lam, s, w))
    assert torch.allclose(sol.center[pulled], theta[:m], rtol=1e-8, atol=1e-10)
    assert torch.allclose(sol.rows, theta[m:].view(n, P), rtol=1e-8, atol=1e-10)
    assert sol.objective == pytest.approx(float(J(theta)), rel=1e-10)
    assert sol.objective == pytest.approx(float(joint_objective(sol.center, sol.rows, xs, ys, s, w, lam)), rel=1e-12)
    q = JointQuadratic.of_tasks(xs, ys, lam, s, w)
    assert reduced_gap(q, sol.center) <= 1e-10 * sol.objective
    moved = sol.center + 0.1 * pulled
    rows = q.task_rows(moved)
    exact_gap = q.objective(moved, rows) - sol.objective
    assert exact_gap > 0 and reduced_gap(q, moved) == pytest.approx(exact_gap, rel=1e-8)


def test_finite_learner_reaches_the_optimum_and_stays_there():
    xs, ys, _, w, _ = problem(1)
    tasks = TaskSet([Task(x, y) for x, y in zip(xs, ys, strict=True)], weights=w)

    def learner():
        torch.manual_seed(0)
        return FiniteMMP(torch.nn.Linear(D, K).double(), tasks, lam={"weight": 2.0, "bias": "private"},
                         task_lam="size", inner=ExactLeastSquares(), center_update="exact")

    fm = learner()
    assert applies_to(fm) is None
    sol = apply_to(fm)
    assert fm.objective() == pytest.approx(sol.objective, rel=1e-12)
    for _ in range(3):  # the optimum is the alternating updates' fixed point
        fm.step()
    assert fm.objective() == pytest.approx(sol.objective, rel=1e-10)
    slow = learner()  # alternating exact updates from w = 0 are still far off after a few steps
    for _ in range(5):
        slow.step()
    assert slow.objective() - sol.objective > 1e-6 * sol.objective
    other = FiniteMMP(torch.nn.Linear(D, K).double(), tasks, loss="cross_entropy", lam=1.0)
    assert "mean squared error" in applies_to(other)


def test_two_level_tree_matches_the_full_joint_system():
    """root → {a, b}; tasks under a, b and one at the root: node centers and rows against the autograd Hessian
    of J with the tree terms Σ_n (m_n λ_n/2)‖θ_n − θ_parent‖²."""
    from metaprox.priors import Tree

    xs, ys, s, w, lam = problem(2)
    n, P = len(xs), K * (D + 1)
    tree = Tree({"root": None, "a": "root", "b": "root"}, ["a", "a", "b", "b", "b", "root"], [0.7], weights=w)
    pulled = lam > 0
    m, N = int(pulled.sum()), len(tree.nodes)
    node = torch.from_numpy(tree.task_node)

    def J(theta_vec):
        theta = torch.zeros(N, P, dtype=torch.float64)
        theta[:, pulled] = theta_vec[:N * m].view(N, m)
        rows = theta_vec[N * m:].view(n, P)
        total = sum(joint_objective(theta[node[t]], rows[t:t + 1], xs[t:t + 1], ys[t:t + 1], s[t:t + 1], w[t:t + 1],
                                    lam) for t in range(n))
        for name, parent in tree.parent.items():
            if parent is not None:
                i, j = tree.index[name], tree.index[parent]
                total = total + 0.5 * tree.mass[i] * tree.lam_up(name) * (theta[i] - theta[j]).square().sum()
        return total

    zero = torch.zeros(N * m + n * P, dtype=torch.float64)
    theta = torch.linalg.solve(torch.autograd.functional.hessian(J, zero), -torch.autograd.functional.jacobian(J, zero))
    from metaprox.joint_ridge import solve_tree

    sol = solve_tree(JointQuadratic.of_tasks(xs, ys, lam, s, w), tree, torch.zeros(N, P, dtype=torch.float64))
    assert torch.allclose(sol.theta[:, pulled], theta[:N * m].view(N, m), rtol=1e-8, atol=1e-10)
    assert torch.allclose(sol.rows, theta[N * m:].view(n, P), rtol=1e-8, atol=1e-10)
    assert sol.objective == pytest.approx(float(J(theta)), rel=1e-10)

    # through the learner: the optimum is the exact block-coordinate sweeps' fixed point
    tasks = TaskSet([Task(x, y) for x, y in zip(xs, ys, strict=True)], weights=w)
    fm = FiniteMMP(torch.nn.Linear(D, K).double(), tasks, lam={"weight": 2.0, "bias": 0.5}, task_lam="size",
                   inner=ExactLeastSquares(), center_update="exact", prior=tree)
    best = apply_to(fm)
    assert fm.objective() == pytest.approx(best.objective, rel=1e-12)
    for _ in range(3):
        fm.step()
    assert fm.objective() == pytest.approx(best.objective, rel=1e-10)
