"""FiniteMMP against closed forms: the regularized multi-task optimum (Evgeniou & Pontil 2004) of linear
least-squares tasks — flat with per-task λ_t, a two-level tree, a graph — and the shared/private limits; task
weights honoured by minibatch center gradients whatever the sampler; penalties other than squared ℓ2 refused where
only squared ℓ2 is right; a new task adapted from its tree node or, under an unknown node, with the series pull."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.priors import Graph, Tree, springs_in_series
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

    def anchor(self, i, k_entries, target):
        """+ Σ_entries k/2 (x_i − target)² toward a fixed point."""
        self.h[self.sl(i), self.sl(i)] += torch.diag(k_entries)
        self.r[self.sl(i)] += k_entries * target

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


# ----- task weights with minibatches (the center gradient's estimator) -------------------------------------------
def two_targets() -> TaskSet:
    """Bias-only tasks (x = 0) with targets 0 and 10, weights 1 and 9: the center's bias minimising J is 9."""
    return TaskSet([metaprox.Task(torch.zeros(1, 1, dtype=DT), torch.full((1, 1), y, dtype=DT)) for y in (0.0, 10.0)],
                   weights=[1.0, 9.0])


@pytest.mark.parametrize("sampler", [None,  # the full batch: the fixed point itself
                                     TaskSampler(2, 4, replacement=True, seed=1),  # uniform i.i.d. (old: 8.1)
                                     TaskSampler(2, 8, replacement=True, probs=[1, 9], seed=1),  # ∝ w (old: 9.87)
                                     TaskSampler(2, 1, seed=1)],  # shuffled epochs of batch 1 (old: 5.0)
                         ids=["full", "iid", "probs", "epochs"])
def test_weighted_tasks_converge_to_the_weighted_optimum(sampler):
    # λ = 2 and exact inner solves: the envelope gradient of task t is c − y_t, so E[c] at stationarity is the
    # w-weighted mean of the targets, 9.0, exactly when the batch estimate of ∇(J/W) is unbiased
    fm = FiniteMMP(torch.nn.Linear(1, 1).to(DT), two_targets(), lam=2.0, inner=metaprox.ExactLeastSquares(),
                   sampler=sampler, outer_lr=0.1)
    bias = []
    for _ in range(400):
        fm.step(monitor=False)
        bias.append(float(fm.fmodel.params()[1].detach()))
    assert abs(np.mean(bias[100:]) - 9.0) < 0.25  # iterate average; sampling noise ~0.1, epochs' O(η) bias 0.07


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimator_weights_are_the_old_ratio_where_it_was_right(dtype):
    # full batch (any weights) and unit weights (any batch): bitwise today's w_t / Σ_batch w_t
    tasks = list(tasks_of_sizes(sizes=(4,) * 7).tasks)
    for weights, batches in (([0.3, 1.7, 2.0, 0.1, 5.0, 1.1, 0.9], [np.arange(7)]),
                             (None, [np.arange(7), np.array([3]), np.array([6, 0, 2]), np.array([1, 1, 4, 5])])):
        fm = FiniteMMP(model().to(dtype), TaskSet(tasks, weights=weights), lam=1.0)
        for idx in batches:
            wt = fm.tasks.weights[idx].to(dtype)
            assert torch.equal(fm._estimator_weights(idx, drawn=True), wt / wt.sum())


def test_estimator_weights_with_probabilities():
    # i.i.d. draws with probabilities p: â_t = (w_t/W)/(B·p_t); explicit indices count as a uniform draw
    ts = TaskSet(list(tasks_of_sizes(sizes=(4,) * 3).tasks), weights=[1.0, 2.0, 5.0])
    fm = FiniteMMP(model(), ts, sampler=TaskSampler(3, 2, replacement=True, probs=[2, 1, 1]))
    idx = np.array([0, 2])
    want = torch.tensor([(1 / 8) / (2 * 0.5), (5 / 8) / (2 * 0.25)], dtype=DT)
    assert torch.allclose(fm._estimator_weights(idx, drawn=True), want, rtol=1e-12)
    assert torch.allclose(fm._estimator_weights(idx, drawn=False), torch.tensor([1 / 8, 5 / 8], dtype=DT) * 3 / 2,
                          rtol=1e-12)


# ----- penalties that only squared ℓ2 makes right ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    ({"center_update": "exact"}, "center_update='exact'"),
    # a tree and a graph: the support matrix's reasons (metaprox.composition)
    ({"center_update": "exact", "prior": Tree({"r": None, "a": "r"}, ["a", "a", "r"], [1.0])}, "tree's pulls are"),
    ({"graph": Graph(3, [(0, 1, 1.0)])}, "graph folds the neighbours"),
])
def test_robust_penalty_is_refused_where_only_squared_l2_is_right(kwargs, needle):
    ts = tasks_of_sizes(sizes=(5, 5, 5))
    robust = RobustL2(1.0, ["weight", "bias"])
    with pytest.raises(ValueError, match=needle) as err:
        FiniteMMP(model(), ts, lam=robust, **kwargs)
    assert "squared-ℓ2" in str(err.value) and "robust" in str(err.value).lower()
    FiniteMMP(model(), ts, lam=robust)  # the gradient center update stays available


# ----- adapting a new task from the tree --------------------------------------------------------------------------
def new_task_optimum(task, center, lam, node_lam=None):
    """argmin_v L(v) + Σ λ/2 (v − center)²; with an unknown node u in between, the v of argmin over (v, u) of
    L(v) + Σ λ/2 (v − u)² + λ_node/2 ‖u − center‖²."""
    q = Quadratic(1 if node_lam is None else 2, len(lam))
    q.data(0, 1.0, *quad(task))
    if node_lam is None:
        q.anchor(0, lam, center)
    else:
        q.couple(0, 1, 1.0, lam)
        q.anchor(1, torch.full_like(lam, node_lam), center)
    return q.solve()[0]


def flat_params(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params["weight"].flatten(), params["bias"].flatten()])


@pytest.fixture(scope="module")
def trained_tree():
    ts = tasks_of_sizes(sizes=(8,) * 6)
    tree = Tree({"root": None, "a": "root", "b": "root", "a1": "a"}, ["a", "a", "b", "b", "a1", "root"], [0.8, 1.5])
    fm = FiniteMMP(model(), ts, lam={"weight": 2.0, "bias": 0.5}, inner=metaprox.ExactLeastSquares(),
                   center_update="exact", prior=tree)
    run(fm, 5)
    new = tasks_of_sizes(sizes=(10,), seed=7)[0]
    return fm, metaprox.Task(new.x, new.y + 2.0)


def test_adapt_from_a_known_node_and_under_an_unknown_one(trained_tree):
    fm, task = trained_tree
    lam = torch.tensor([2.0, 2.0, 2.0, 0.5], dtype=DT)
    theta = {n: fm.theta[fm.prior.index[n]] for n in fm.prior.nodes}
    assert (theta["a"] - theta["root"]).abs().max() > 0.1  # the nodes moved apart: the cases differ
    assert torch.allclose(flat_params(fm.adapt(task, node="a")), new_task_optimum(task, theta["a"], lam),
                          atol=1e-10, rtol=0)
    # a new node under the root (node=None): joint minimiser over v and its center
    want = new_task_optimum(task, theta["root"], lam, node_lam=0.8)
    assert torch.allclose(flat_params(fm.adapt(task)), want, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="not in the tree"):  # a typo must not adapt from the root silently
        fm.adapt(task, node="never-seen")
    with pytest.raises(ValueError, match="lam= overrides"):
        fm.adapt(task, lam=0.5)
    assert torch.equal(theta["root"], fm.w_row())
    # an unknown node under "a" (depth 2): from θ_a with λ_level2 in series
    want = new_task_optimum(task, theta["a"], lam, node_lam=1.5)
    assert torch.allclose(flat_params(fm.adapt(task, parent="a")), want, atol=1e-10, rtol=0)


def test_adapt_errors_and_the_flat_case(trained_tree):
    fm, task = trained_tree
    with pytest.raises(ValueError, match="depth 3"):
        fm.adapt(task, parent="a1")  # lam_levels has no λ for a third level
    with pytest.raises(ValueError, match="not a node"):
        fm.adapt(task, parent="zz")
    with pytest.raises(ValueError, match="only for a new node"):
        fm.adapt(task, node="a1", parent="a")
    flat_fm = FiniteMMP(model(), TaskSet([task]), lam=1.0, inner=metaprox.ExactLeastSquares())
    with pytest.raises(ValueError, match="needs a Tree prior"):
        flat_fm.adapt(task, node="a")
    # without a prior: ridge toward w with λ (the inherited behaviour)
    want = new_task_optimum(task, flat_fm.w_row(), torch.ones(4, dtype=DT))
    assert torch.allclose(flat_params(flat_fm.adapt(task)), want, atol=1e-10, rtol=0)
    want = new_task_optimum(task, flat_fm.w_row(), torch.full((4,), 0.3, dtype=DT))  # lam= as MetaLearner.adapt
    assert torch.allclose(flat_params(flat_fm.adapt(task, lam=0.3)), want, atol=1e-10, rtol=0)


def test_springs_in_series():
    assert springs_in_series(2.0, 2.0) == 1.0
    assert springs_in_series(3.0) == 3.0 and springs_in_series(0.0, 5.0) == 0.0
    assert springs_in_series(float("inf"), 4.0) == 4.0


def test_tree_weights_must_be_the_task_sets():
    ts = TaskSet(list(tasks_of_sizes(sizes=(4, 4)).tasks), weights=[1.0, 3.0])
    tree = Tree({"root": None, "a": "root"}, ["a", "a"], [1.0])  # default weights 1: node masses would be wrong
    with pytest.raises(ValueError, match="weights=tasks.weights"):
        FiniteMMP(model(), ts, center_update="exact", prior=tree)
    FiniteMMP(model(), ts, center_update="exact", prior=Tree({"root": None, "a": "root"}, ["a", "a"], [1.0],
                                                             weights=ts.weights))
    with pytest.raises(ValueError, match="finite λ"):
        springs_in_series(float("inf"))


def test_step_has_the_learners_signature_and_refuses_weights_or_places():
    """``FiniteMMP.step(tasks, weights, monitor, where)`` as :meth:`MetaLearner.step`: ``tasks`` are task indices;
    the weights are the task set's estimator's and the centers the prior's, so passing either is an error."""
    fm = FiniteMMP(model(), tasks_of_sizes(), lam=1.0, inner=metaprox.ExactLeastSquares())
    w0 = fm.w_row().clone()
    for bad in ({"weights": [1.0, 1.0]}, {"where": ["a", "b"]}):
        with pytest.raises(ValueError, match="task indices only"):
            fm.step([0, 1], **bad)
    assert fm.step_count == 0 and torch.equal(fm.w_row(), w0)
    diag = fm.step([0, 1], None, False)
    assert fm.step_count == 1 and diag["tasks"] == 2.0 and "inner_stationarity" not in diag
