"""Rules × priors × pulls × memories: every rule on a finite task set (TaskMemory), rules under a tree prior,
the refusals computed by metaprox.composition, and the support matrix in docs/composition.md."""

from pathlib import Path

import numpy as np
import pytest
import torch

import metaprox
from conftest import linear_model, linear_tasks, quad_terms
from metaprox.algorithms.hierarchical import TreePrior
from metaprox.composition import MEMORIES, PRIORS, PULLS, RULES, refusal, support_matrix
from metaprox.memory import TaskMemory
from metaprox.tasks.taskset import TaskSet

DT = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _theta(model):
    return torch.cat([model.weight.detach().flatten(), model.bias.detach().flatten()])


def test_reptile_on_a_finite_quadratic_set_reaches_its_closed_form():
    """Full-batch Reptile with M SGD steps of lr α from w: v_t − a_t = (I − αH_t)^M (w − a_t), so its fixed point
    solves Σ_t q_t (I − (I − αH_t)^M)(w − a_t) = 0 (q_t = w_t/W)."""
    tasks = linear_tasks(n_tasks=4, n=12, d=3)
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=DT)
    alpha, m = 0.05, 3
    rep = metaprox.Reptile(linear_model(), "mse", inner=metaprox.SGD(lr=alpha, steps=m), outer_lr=alpha * m,
                           schedule="constant")
    memory = TaskMemory(rep, TaskSet(tasks, weights=weights))
    for _ in range(800):
        rep.step(monitor=False)
    lhs, rhs = torch.zeros(4, 4, dtype=DT), torch.zeros(4, dtype=DT)
    for t, q in zip(tasks, weights / weights.sum(), strict=True):
        h, b = quad_terms(t)
        a_t = torch.linalg.solve(h, b)
        contraction = torch.eye(4, dtype=DT) - torch.linalg.matrix_power(torch.eye(4, dtype=DT) - alpha * h, m)
        lhs += q * contraction
        rhs += q * contraction @ a_t
    want = torch.linalg.solve(lhs, rhs)
    assert torch.allclose(_theta(rep.model), want, atol=1e-10, rtol=0)
    # the memory keeps each task's fine-tuned v_t (M steps from the final w)
    h, b = quad_terms(tasks[2])
    a_2 = torch.linalg.solve(h, b)
    v_2 = a_2 + torch.linalg.matrix_power(torch.eye(4, dtype=DT) - alpha * h, m) @ (want - a_2)
    got = memory.task_params(2)
    assert torch.allclose(torch.cat([got["weight"].flatten(), got["bias"].flatten()]), v_2, atol=1e-9)


def _with_query(tasks):
    return [metaprox.Task(t.x[:8], t.y[:8], t.x[8:], t.y[8:]) for t in tasks]


RULE_ARGS = {
    "mmp": (metaprox.MetaMinibatchProx, {"lam": 1.0}),
    "reptile": (metaprox.Reptile, {}),
    "fomaml": (metaprox.FOMAML, {}),
    "maml": (metaprox.MAML, {}),
    "imaml": (metaprox.IMAML, {"lam": 1.0, "cg_steps": 4}),
}


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_runs_on_a_finite_set_as_the_weighted_step(rule):
    """One full-batch step with a memory = the plain step on the same tasks weighted by w_t; the solutions are
    stored; a minibatch step uses the unbiased weights â_t = (w_t/W)/(B/n) (no batch normalising)."""
    cls, kw = RULE_ARGS[rule]
    tasks = _with_query(linear_tasks(n_tasks=5, n=14, d=3))
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.5], dtype=DT)
    inner = metaprox.SGD(lr=0.05, steps=3)
    a = cls(linear_model(), "mse", inner=inner, outer_lr=0.3, schedule="constant", **kw)
    b = cls(linear_model(), "mse", inner=inner, outer_lr=0.3, schedule="constant", **kw)
    mem = TaskMemory(a, TaskSet(tasks, weights=weights))
    a.step(monitor=False)
    b.step(tasks, weights, monitor=False)
    assert torch.allclose(_theta(a.model), _theta(b.model), atol=1e-12, rtol=0)
    assert bool(mem.store.seen.all())
    # a minibatch of explicit indices: Σ â_t = B·(mean w of the batch)/W·n/B, the estimator, not a normalised mean
    c = cls(linear_model(), "mse", inner=inner, outer_lr=0.3, schedule="constant", **kw)
    d = cls(linear_model(), "mse", inner=inner, outer_lr=0.3, schedule="constant", **kw)
    TaskMemory(c, TaskSet(tasks, weights=weights))
    idx = np.array([1, 3])
    c.step(idx, monitor=False)
    a_hat = weights[idx] / (weights.sum() * 2 / 5)
    d.step([tasks[i] for i in idx], a_hat, monitor=False)
    # d normalises by Σ â: rescale its step to the unnormalised one
    w0 = _theta(linear_model())
    assert torch.allclose(_theta(c.model) - w0, (_theta(d.model) - w0) * float(a_hat.sum()), atol=1e-12)


def test_a_warm_started_rule_reads_the_memory_and_the_others_start_at_the_center():
    """Step 2 solves task 0 from its stored v_t (MMP: a prox problem, unique solution) or from w (Reptile):
    two plain gradient steps on ½vᵀHv − bᵀv + (λ/2)‖v − w‖², written out."""
    tasks = _with_query(linear_tasks(n_tasks=3, n=14, d=3))
    alpha = 0.05
    inner = metaprox.SGD(lr=alpha, steps=2)
    mmp = metaprox.MetaMinibatchProx(linear_model(), "mse", lam=1.0, inner=inner, outer_lr=0.3)
    rep = metaprox.Reptile(linear_model(), "mse", inner=inner, outer_lr=0.3)
    assert TaskMemory(mmp, TaskSet(tasks)).warm_start and not TaskMemory(rep, TaskSet(tasks)).warm_start
    h, b = quad_terms(tasks[0])
    for ln, lam in ((mmp, 1.0), (rep, 0.0)):
        ln.step(monitor=False)
        p = ln.memory.task_params(0)
        v1 = torch.cat([p["weight"].flatten(), p["bias"].flatten()])
        w1 = _theta(ln.model)
        ln.step(monitor=False)
        v = v1.clone() if lam else w1.clone()
        for _ in range(2):
            v = v - alpha * (h @ v - b + lam * (v - w1))
        p = ln.memory.task_params(0)
        assert torch.allclose(torch.cat([p["weight"].flatten(), p["bias"].flatten()]), v, atol=1e-12, rtol=0)


def test_a_tree_prior_composes_with_reptile_and_refuses_second_order_maml():
    tasks = linear_tasks(n_tasks=4)
    rep = metaprox.Reptile(linear_model(), "mse", inner=metaprox.SGD(lr=0.05, steps=2), outer_lr=0.3)
    tree = TreePrior(rep, [1.0])
    w0 = _theta(rep.model)
    groups = ["a", "a", "b", "b", "b"]
    tasks = tasks + [linear_tasks(n_tasks=1, seed=5)[0]]
    diag = rep.step(tasks, where=groups, monitor=True)
    assert set(tree.nodes) == {("a",), ("b",)} and np.isfinite(diag["phi"])
    # the nodes start at w: the tasks move them, the root has no task and no pull yet
    assert torch.equal(_theta(rep.model), w0) and not torch.equal(tree.nodes[("a",)][0], rep.model.weight)
    for _ in range(500):
        rep.step(tasks, where=groups, monitor=False)
    # stationary root: its gradient Σ_n â_n λ_1 (w − θ_n) vanishes, so w is the mass-weighted mean of the nodes
    mean = [(2 * a + 3 * b) / 5 for a, b in zip(tree.nodes[("a",)], tree.nodes[("b",)], strict=True)]
    for p, m in zip((rep.model.weight, rep.model.bias), mean, strict=True):
        assert torch.allclose(p.detach(), m, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="second-order MAML differentiates"):
        TreePrior(metaprox.MAML(linear_model(), "mse"), [1.0])
    TreePrior(metaprox.MAML(linear_model(), "mse", first_order=True), [1.0])  # FOMAML's rule works


def test_refusals_name_their_reason():
    with pytest.raises(ValueError, match="per-task pulls"):
        TaskMemory(metaprox.MAML(linear_model(), "mse", lam=1.0), TaskSet(_with_query(linear_tasks())),
                   task_lam=[1.0, 2.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no query set"):
        TaskMemory(metaprox.FOMAML(linear_model(), "mse"), TaskSet(linear_tasks()))
    rob = metaprox.MetaMinibatchProx(linear_model(), "mse", lam=metaprox.RobustL2(1.0, ["weight", "bias"]))
    with pytest.raises(ValueError, match="tree's pulls are squared"):
        TreePrior(rob, [1.0])
    assert refusal("reptile", "flat", "l2", "memmap") is None
    assert "persistent memory" in refusal("mmp", "graph", "l2", "none")


def test_the_support_matrix_in_the_docs_is_generated_by_the_code():
    """docs/composition.md holds metaprox.composition.support_matrix() verbatim (regenerate it with
    ``python -c "from metaprox.composition import support_matrix; print(support_matrix())"``)."""
    doc = (ROOT / "docs" / "composition.md").read_text()
    assert support_matrix() in doc
    rows = support_matrix().splitlines()[2:]
    assert len(rows) == len(RULES) * len(PRIORS) * len(PULLS) * len(MEMORIES)
    assert any(r.endswith("| works |") for r in rows) and any(not r.endswith("| works |") for r in rows)


def test_hierarchical_mmp_gets_weights_monitors_and_inner_data_from_the_one_step():
    """Weights: a task of weight 3 counts as three copies of it; monitors: the σ²/φ diagnostics of every rule;
    inner_data: support ∪ query is solved on."""
    tasks = _with_query(linear_tasks(n_tasks=2, n=14, d=3))

    def hm(**kw):
        return metaprox.HierarchicalMMP(linear_model(), "mse", lam=1.5, lam_group=0.5,
                                        inner=metaprox.SGD(lr=0.05, steps=3), outer_lr=0.4, **kw)
    weighted, copies = hm(), hm()
    diag = weighted.step(tasks, where=["a", "b"], weights=[1.0, 3.0])
    copies.step([tasks[0]] + [tasks[1]] * 3, where=["a", "b", "b", "b"])
    assert torch.allclose(_theta(weighted.model), _theta(copies.model), atol=1e-12, rtol=0)
    for path in (("a",), ("b",)):
        for p, q in zip(weighted.nodes[path], copies.nodes[path], strict=True):
            assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert {"phi", "sigma2", "inner_stationarity", "groups"} <= set(diag)
    union = hm(inner_data="support+query")
    union.step(tasks, where=["a", "b"])
    full = [metaprox.Task(torch.cat([t.x, t.x_query]), torch.cat([t.y, t.y_query])) for t in tasks]
    ref = hm()
    ref.step(full, where=["a", "b"])
    assert torch.allclose(_theta(union.model), _theta(ref.model), atol=1e-12, rtol=0)
    for p, q in zip(union.nodes[("a",)], ref.nodes[("a",)], strict=True):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
