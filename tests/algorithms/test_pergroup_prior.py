"""Priors per parameter group: a tree on some parameters, the others flat (centered at w for every task).

- :func:`metaprox.priors.partition` labels parameters by the first matching pattern and names the parameter or
  pattern that is unmatched, unknown or shadowed;
- a per-group tree prior on least-squares tasks reaches the stationary point of its joint objective, computed
  in the test as one linear system over the tree parameters of every node and the flat parameters of w;
- the whole tree (``groups=None``) is the special case where every parameter follows it;
- second-order MAML is refused with a per-group tree (composition.refusal), and adaptation under unknown levels
  weakens only the tree parameters' pull (closed form).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metaprox
from metaprox.algorithms.hierarchical import HierarchicalMMP
from metaprox.priors import TreePrior, partition

DT = torch.float64
LAM = 2.0
PATHS = [("a", "x"), ("a", "x"), ("a", "y"), ("a",), ("b", "x"), ("b", "x")]
SHIFTS = [3.0, 2.5, 1.0, 2.0, -3.0, -2.0]
SLOPES = [1.0, 1.5, -0.5, 0.5, -1.0, 2.0]
LEVELS = (0.7, 1.5)
TREE = [True, True, False]  # entries of v = (weight₁, weight₂, bias): the weights follow the tree, the bias is flat


def task(seed: int, shift: float, slope: float, n: int = 6) -> metaprox.Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=DT)
    y = x @ torch.tensor([[slope], [-1.0]], dtype=DT) + shift + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
    return metaprox.Task(x, y)


def quad(t: metaprox.Task) -> tuple[torch.Tensor, torch.Tensor]:
    """A, b of the mse loss L(v) = ½vᵀAv − bᵀv + const over v = (weight, bias)."""
    xa = torch.cat([t.x, torch.ones(t.num_examples, 1, dtype=DT)], 1)
    return 2.0 / t.num_examples * xa.T @ xa, 2.0 / t.num_examples * (xa.T @ t.y).flatten()


def flat(params) -> torch.Tensor:
    if isinstance(params, dict):
        params = [params["weight"], params["bias"]]
    return torch.cat([p.detach().flatten() for p in params])


def learner(groups, lam_levels=LEVELS, **kwargs) -> HierarchicalMMP:
    torch.manual_seed(0)
    return HierarchicalMMP(torch.nn.Linear(2, 1).to(DT), "mse", lam=LAM, lam_levels=lam_levels,
                           inner=metaprox.ExactLeastSquares(), groups=groups, **kwargs)


def stationary_point(tasks, paths, follows) -> dict[tuple, torch.Tensor]:
    """The full centers (3 entries) of every node at the stationary point of
    F = Σ_t â φ_t(c_node(t)) + Σ_{n ≠ root} (â m_n λ_n/2)‖θ_n − θ_parent‖² over the tree entries,
    c_n = (θ_n on tree entries, w on flat ones), φ_t(c) = min_v L_t(v) + λ/2‖v − c‖², so
    ∇φ_t(c) = λ(I − λ(A_t + λI)⁻¹)c − λ(A_t + λI)⁻¹b_t. Unknowns z = (tree entries of every node incl. the
    root, flat entries of w); c_n = S_n z with a 0/1 selection S_n, and ∇F(z) = 0 is one linear system."""
    nodes = [()] + sorted({p[:d] for p in paths for d in range(1, len(p) + 1)})
    tree_idx = [i for i, on in enumerate(follows) if on]
    flat_idx = [i for i, on in enumerate(follows) if not on]
    k, p_dim = len(tree_idx), len(follows)
    size = len(nodes) * k + len(flat_idx)

    def select(n) -> torch.Tensor:  # c_n = S_n z
        s = torch.zeros(p_dim, size, dtype=DT)
        base = nodes.index(n) * k
        for j, i in enumerate(tree_idx):
            s[i, base + j] = 1.0
        for j, i in enumerate(flat_idx):
            s[i, len(nodes) * k + j] = 1.0
        return s

    a, eye = 1.0 / len(tasks), torch.eye(p_dim, dtype=DT)
    mat, rhs = torch.zeros(size, size, dtype=DT), torch.zeros(size, dtype=DT)
    for t, path in zip(tasks, paths, strict=True):
        A, b = quad(t)
        inv, s = torch.linalg.inv(A + LAM * eye), select(path)
        mat += a * s.T @ (LAM * (eye - LAM * inv)) @ s
        rhs += a * s.T @ (LAM * inv @ b)
    for n in nodes[1:]:
        d = select(n) - select(n[:-1])  # zero on the flat entries
        mat += a * sum(1 for p in paths if p[:len(n)] == n) * LEVELS[len(n) - 1] * d.T @ d
    z = torch.linalg.solve(mat, rhs)
    return {n: select(n) @ z for n in nodes}


def test_partition_labels_by_the_first_matching_pattern():
    names = ["trunk.0.weight", "trunk.0.bias", "head.weight", "head.bias"]
    assert partition(names, [("head.*", "tree"), ("*", "flat")]) == ["flat", "flat", "tree", "tree"]
    assert partition(names, [("re:trunk\\.\\d+\\.bias", "tree")], default="flat") == ["flat", "tree", "flat", "flat"]
    assert partition(names, [("head.bias", "a"), ("head.*", "b")], default="c") == ["c", "c", "b", "a"]


@pytest.mark.parametrize("rules, default, match", [
    ([("head.*", "tree")], None, "parameter 'trunk.0.weight' matches none of the patterns"),
    ([("haed.*", "tree")], "flat", "pattern 'haed.\\*' matches no parameter"),
    ([("head.*", "tree"), ("head.bias", "flat")], "flat", "'head.bias' by 'head.\\*'.*reorder or remove"),
    ([("re:head.(", "tree")], "flat", "not a valid regular expression"),
    ([("", "tree")], "flat", "non-empty string"),
])
def test_partition_names_the_parameter_or_pattern_at_fault(rules, default, match):
    with pytest.raises(ValueError, match=match):
        partition(["trunk.0.weight", "head.weight", "head.bias"], rules, default)


def test_per_group_tree_converges_to_the_linear_system_stationary_point():
    tasks = [task(i, s, m) for i, (s, m) in enumerate(zip(SHIFTS, SLOPES, strict=True))]
    want = stationary_point(tasks, PATHS, TREE)
    hm = learner([("weight", "tree"), ("bias", "flat")], outer_lr=1.5, group_lr=(0.5, 2.0))
    for _ in range(400):
        hm.step(tasks, where=PATHS, monitor=False)
    assert torch.allclose(flat(hm.center()), want[()], atol=1e-10)
    for n, c in hm.nodes.items():
        assert torch.allclose(flat(c), want[n], atol=1e-10), n  # the nodes store w's bias
        assert torch.allclose(flat(hm.node_center(n)), want[n], atol=1e-10), n
    # not degenerate: the weights differ across levels, and the per-group optimum is not the whole tree's
    assert float((want[("a", "x")][:2] - want[()][:2]).abs().max()) > 0.1
    whole = stationary_point(tasks, PATHS, [True, True, True])
    assert float((whole[("a", "x")][2] - want[()][2]).abs()) > 0.1


def test_the_whole_tree_is_the_case_where_every_group_follows_it():
    tasks = [task(i, s, m) for i, (s, m) in enumerate(zip(SHIFTS, SLOPES, strict=True))]
    whole, ruled = learner(None, group_lr=1.0), learner([("*", "tree")], group_lr=1.0)
    for _ in range(3):
        whole.step(tasks, where=PATHS, monitor=False)
        ruled.step(tasks, where=PATHS, monitor=False)
    assert torch.equal(flat(whole.center()), flat(ruled.center()))
    for n in whole.nodes:
        assert torch.equal(flat(whole.nodes[n]), flat(ruled.nodes[n]))


def test_adaptation_under_unknown_levels_weakens_only_the_tree_groups_pull():
    hm = learner([("weight", "tree")], outer_lr=0.5, group_lr=1.0)
    tasks = [task(i, s, m) for i, (s, m) in enumerate(zip(SHIFTS, SLOPES, strict=True))]
    for _ in range(5):
        hm.step(tasks, where=PATHS, monitor=False)
    t = task(99, 1.0, 0.3)
    A, b = quad(t)
    c = flat(hm.node_center(("a",)))
    lam_eff = 1.0 / (1.0 / LAM + 1.0 / LEVELS[1])  # the unknown subgroup's spring in series with the task's
    pull = torch.diag(torch.tensor([lam_eff, lam_eff, LAM], dtype=DT))
    want = torch.linalg.solve(A + pull, b + pull @ c)
    assert torch.allclose(flat(hm.adapt(t, where=("a", "new"))), want, atol=1e-10)
    known = hm.node_center(("a", "x"))
    want_known = torch.linalg.solve(A + LAM * torch.eye(3, dtype=DT), b + LAM * flat(known))
    assert torch.allclose(flat(hm.adapt(t, where=("a", "x"))), want_known, atol=1e-10)
    with pytest.raises(ValueError, match="separate calls"):
        hm.adapt_tasks([t, t], where=[("a", "x"), ("a", "new")])


def test_second_order_maml_with_a_per_group_tree_is_refused_and_bad_rules_are_named():
    torch.manual_seed(0)
    maml = metaprox.MAML(torch.nn.Linear(2, 1).to(DT), "mse", lam=1.0)
    with pytest.raises(ValueError, match="second-order MAML.*first_order=True"):
        TreePrior(maml, [1.0], groups=[("weight", "tree")])
    with pytest.raises(ValueError, match="pattern 'wieght' matches no parameter"):
        learner([("wieght", "tree")])
    with pytest.raises(ValueError, match="no parameter follows the tree"):
        learner([("*", "flat")])
    with pytest.raises(ValueError, match="prior one of"):
        learner([("weight", "graph")])
    from metaprox.algorithms.multihead import MultiHeadMMP
    from metaprox.models.shared_trunk import SharedTrunk

    mh = MultiHeadMMP(SharedTrunk(torch.nn.Linear(2, 3), {"a": torch.nn.Linear(3, 1)}), "mse")
    with pytest.raises(ValueError, match="a tree prior over it .* is not built"):
        TreePrior(mh, [1.0])


def finite_joint_optimum(tasks, nodes, parent, levels, follows) -> torch.Tensor:
    """argmin of the finite joint objective with a per-group tree, as one linear system:
    J = Σ_t [L_t(v_t) + λ/2‖v_t − c_node(t)‖²] + Σ_{n ≠ root} (m_n λ_depth(n)/2)‖θ_n − θ_parent‖² (tree entries),
    c_n = (θ_n on tree entries, w on flat ones). Unknowns z = (v_1..v_T, tree entries of every node, flat
    entries of w). Returns z's rows as [v_1..v_T, c_root]."""
    names = list(parent)

    def path(n) -> list[str]:  # n and its ancestors up to the root
        return [n] + (path(parent[n]) if parent[n] is not None else [])
    depth = {n: len(path(n)) - 1 for n in names}
    tree_idx = [i for i, on in enumerate(follows) if on]
    flat_idx = [i for i, on in enumerate(follows) if not on]
    p, k, nt = len(follows), len(tree_idx), len(tasks)
    size = nt * p + len(names) * k + len(flat_idx)

    def task_rows(t) -> torch.Tensor:
        e = torch.zeros(p, size, dtype=DT)
        e[:, t * p:(t + 1) * p] = torch.eye(p, dtype=DT)
        return e

    def center(n) -> torch.Tensor:
        s = torch.zeros(p, size, dtype=DT)
        base = nt * p + names.index(n) * k
        for j, i in enumerate(tree_idx):
            s[i, base + j] = 1.0
        for j, i in enumerate(flat_idx):
            s[i, nt * p + len(names) * k + j] = 1.0
        return s

    h, r = torch.zeros(size, size, dtype=DT), torch.zeros(size, dtype=DT)
    for t, (task_, node) in enumerate(zip(tasks, nodes, strict=True)):
        A, b = quad(task_)
        e, d = task_rows(t), task_rows(t) - center(node)
        h += e.T @ A @ e + LAM * d.T @ d
        r += e.T @ b
    for n in names:
        if parent[n] is not None:
            below = sum(1 for m in nodes if n in path(m))
            d = center(n) - center(parent[n])
            h += below * levels[depth[n] - 1] * d.T @ d
    z = torch.linalg.solve(h, r)
    return torch.cat([z[:nt * p].view(nt, p), (center("root") @ z).view(1, p)])


def test_finite_per_group_tree_reaches_the_joint_optimum():
    from metaprox.algorithms.finite import FiniteMMP
    from metaprox.priors import Tree
    from metaprox.tasks.taskset import TaskSet

    parent = {"root": None, "a": "root", "ax": "a", "b": "root"}
    nodes = ["ax", "ax", "a", "b", "b", "ax"]
    levels = [0.7, 1.5]
    tasks = [task(i, s, m) for i, (s, m) in enumerate(zip(SHIFTS, SLOPES, strict=True))]
    want = finite_joint_optimum(tasks, nodes, parent, levels, TREE)
    torch.manual_seed(0)
    tree = Tree(parent, nodes, levels, groups=[("weight", "tree"), ("bias", "flat")])
    fm = FiniteMMP(torch.nn.Linear(2, 1).to(DT), TaskSet(tasks), lam=LAM, inner=metaprox.ExactLeastSquares(),
                   center_update="exact", prior=tree)
    for _ in range(400):
        fm.step(monitor=False)
    assert torch.allclose(fm.rows(np.arange(len(tasks))), want[:-1], atol=1e-7)
    assert torch.allclose(fm.w_row(), want[-1], atol=1e-7)
    flat_entry = fm.theta[:, 2]  # the bias: one value at every node
    assert torch.equal(flat_entry, flat_entry[0].expand_as(flat_entry))
    # not degenerate: the tree's weights differ across nodes, and tying the bias changes the optimum
    assert float((fm.theta[tree.index["ax"], :2] - fm.theta[tree.index["root"], :2]).abs().max()) > 0.1
    whole = finite_joint_optimum(tasks, nodes, parent, levels, [True, True, True])
    assert float((whole[:-1] - want[:-1]).abs().max()) > 1e-3
    # a new node under "a": the tree's weights are pulled with the series λ_eff, the flat bias with λ
    t = task(99, 1.0, 0.3)
    A, b = quad(t)
    lam_eff = 1.0 / (1.0 / LAM + 1.0 / levels[1])
    pull = torch.diag(torch.tensor([lam_eff, lam_eff, LAM], dtype=DT))
    c = fm.theta[tree.index["a"]]
    got = fm.adapt(t, parent="a")
    assert torch.allclose(flat(got), torch.linalg.solve(A + pull, b + pull @ c), atol=1e-10)


def test_an_unbound_per_group_tree_refuses_to_sweep():
    from metaprox.priors import Tree

    tree = Tree({"r": None, "a": "r"}, ["a"], [1.0], groups=[("weight", "tree")])
    with pytest.raises(ValueError, match="bind it"):
        tree.update_nodes(torch.zeros(2, 3, dtype=DT), torch.zeros(1, 3, dtype=DT), torch.ones(1, 3, dtype=DT))
    with pytest.raises(ValueError, match="pattern 'weight' matches no parameter"):
        tree.bind(["w", "b"], [2, 1])
