"""MultiHeadMMP / FiniteMultiHeadMMP: prox-coupled trunk, private heads of different shapes per task."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from metaprox import SGD, Task, TaskSet
from metaprox.algorithms.multihead import FiniteMultiHeadMMP, MultiHeadMMP
from metaprox.models.shared_trunk import SharedTrunk

OUT = (1, 2, 3, 2, 1)  # output dimension of each regression task


def _regression_problem(seed: int = 0):
    """5 regression tasks with 1-, 2- and 3-d outputs; trunk x ↦ tanh(Ux), heads h ↦ V_t h (no biases).

    A *purely linear* trunk would make the joint objective ill-posed: scaling every trunk (and w) by a and every
    head by 1/a keeps the fit, leaves Σ‖U_t − w‖² = 0 when all U_t = w, and sends the head ridge to 0, so the
    infimum sits at infinity (found the hard way: L-BFGS walked to ‖U‖ ≈ 3000, ‖V‖ ≈ 0.001). The tanh breaks
    the scaling (saturation), the head ridge μ‖V‖² stops the opposite direction, and the minimum is attained.
    """
    g = torch.Generator().manual_seed(seed)
    d, k, n = 4, 3, 40
    base = torch.randn(k, d, generator=g, dtype=torch.float64) / d ** 0.5
    tasks = []
    for o in OUT:
        u = base + 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
        v = torch.randn(o, k, generator=g, dtype=torch.float64) / k ** 0.5
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        tasks.append(Task(x, x @ u.T @ v.T + 0.1 * torch.randn(n, o, generator=g, dtype=torch.float64)))
    torch.manual_seed(seed)
    model = SharedTrunk(nn.Sequential(nn.Linear(d, k, bias=False), nn.Tanh()),
                        {f"o{o}": nn.Linear(k, o, bias=False) for o in sorted(set(OUT))}).double()
    return TaskSet(tasks), [f"o{o}" for o in OUT], model


def test_finite_trunk_and_heads_of_three_shapes_reach_the_joint_optimum():
    """Block-coordinate MMP (warm-started inner GD, outer step 1/λ = exact center) reaches the minimiser of the
    joint objective J = Σ_t [mse_t(V_t tanh(U_t x)) + λ/2‖U_t − w‖² + μ/2‖V_t‖²] that full-batch L-BFGS finds
    in float64 from the model's initialisation: same value, same fitted functions, vanishing joint gradient."""
    ts, kinds, model = _regression_problem()
    lam, mu, n = 1.0, 0.1, len(kinds)

    def j(w, us, vs):
        total = 0.0
        for t in range(n):
            pred = torch.tanh(ts[t].x @ us[t].T) @ vs[t].T
            total = total + (pred - ts[t].y).square().mean() + lam / 2 * (us[t] - w).square().sum() \
                + mu / 2 * vs[t].square().sum()
        return total

    fm = FiniteMultiHeadMMP(copy.deepcopy(model), ts, kinds, loss="mse", lam=lam, head_lam=mu, head_init="zero",
                            inner=SGD(lr=0.3, steps=10, momentum=0.5), outer_lr=1.0 / lam)
    j0 = fm.objective()
    for _ in range(300):
        fm.step(monitor=False)
    ours = fm.objective()
    assert ours < j0

    w0 = model.trunk[0].weight.detach()
    xs = [w0.clone() for _ in range(n + 1)] + [torch.zeros(o, 3, dtype=torch.float64) for o in OUT]
    xs = [t.requires_grad_(True) for t in xs]
    opt = torch.optim.LBFGS(xs, lr=1.0, max_iter=2000, tolerance_grad=1e-11, tolerance_change=0,
                            history_size=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = j(xs[0], xs[1:1 + n], xs[1 + n:])
        val.backward()
        return val

    opt.step(closure)
    direct = float(j(xs[0], xs[1:1 + n], xs[1 + n:]).detach())
    assert ours == pytest.approx(direct, rel=1e-6)
    w = fm.center()[0].clone().requires_grad_(True)
    us, vs = [], []
    for t in range(n):
        p = fm.task_params(t)
        us.append(p["trunk.0.weight"].clone().requires_grad_(True))
        vs.append(p["head.weight"].clone().requires_grad_(True))
        assert vs[t].shape == (OUT[t], 3)
        # parameters agree up to the signed permutations of hidden units (tanh is odd): compare the functions
        ref = torch.tanh(ts[t].x @ xs[1 + t].detach().T) @ xs[1 + n + t].detach().T
        torch.testing.assert_close(fm.predict_task(t, ts[t].x), ref, atol=3e-3, rtol=0)
    grads = torch.autograd.grad(j(w, us, vs), [w, *us, *vs])
    assert max(float(g.abs().max()) for g in grads) < 1e-3


def _cls_tasks(seed: int):
    g = torch.Generator().manual_seed(seed)
    spec = [("w3", 3, 6), ("w5", 5, 10), ("w3", 3, 9), ("w5", 5, 10), ("w3", 3, 6)]  # (kind, ways, examples)
    tasks = [Task(torch.randn(n, 4, generator=g), torch.randint(0, w, (n,), generator=g)) for _, w, n in spec]
    return tasks, [k for k, _, _ in spec]


def _cls_model():
    torch.manual_seed(1)
    return SharedTrunk(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), {"w3": nn.Linear(6, 3), "w5": nn.Linear(6, 5)})


def test_mixed_meta_batch_equals_weighted_average_of_shape_groups():
    tasks, kinds = _cls_tasks(0)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    inner = SGD(lr=0.3, steps=8)
    model = _cls_model()
    w0 = [p.detach().clone() for p in model.trunk.parameters()]
    mixed = MultiHeadMMP(copy.deepcopy(model), lam=0.7, inner=inner)
    mixed.step(tasks, weights, where=kinds)
    delta = [p.detach() - q for p, q in zip(mixed.shared_model.trunk.parameters(), w0, strict=True)]
    groups = {}
    for i, (t, kd) in enumerate(zip(tasks, kinds, strict=True)):
        groups.setdefault((kd, t.x.shape[0]), []).append(i)
    assert len(groups) == 3
    expect = [torch.zeros_like(d) for d in delta]
    for idx in groups.values():
        sep = MultiHeadMMP(copy.deepcopy(model), lam=0.7, inner=inner)
        sep.step([tasks[i] for i in idx], weights[idx], where=[kinds[i] for i in idx])
        frac = float(weights[idx].sum() / weights.sum())
        for e, p, q in zip(expect, sep.shared_model.trunk.parameters(), w0, strict=True):
            e.add_(frac * (p.detach() - q))
    for d, e in zip(delta, expect, strict=True):
        torch.testing.assert_close(d, e, atol=1e-6, rtol=1e-5)
    # the head modules (private, λ = 0) are never averaged into anything
    for kd in ("w3", "w5"):
        for p, q in zip(mixed.shared_model.heads[kd].parameters(), model.heads[kd].parameters(), strict=True):
            assert torch.equal(p, q)


def test_meta_gradient_is_the_envelope_gradient_of_the_trunk():
    """One task, plain GD outer step lr=1: Δw = −λ(w − trunk*), trunk* the inner solution (adapt gives it)."""
    tasks, kinds = _cls_tasks(1)
    learner = MultiHeadMMP(_cls_model(), lam=0.5, inner=SGD(lr=0.3, steps=12))
    v = learner.adapt(tasks[1], where="w5")
    w0 = [p.detach().clone() for p in learner.center()]
    learner.step([tasks[1]], where=["w5"])
    for name, p, q in zip(learner.names, learner.center(), w0, strict=True):
        torch.testing.assert_close(p, q - 0.5 * (q - v["trunk." + name]), atol=1e-6, rtol=1e-5)
    assert v["head.weight"].shape == (5, 6)


def test_shared_trunk_is_joint_training_and_heads_persist():
    """lam='shared': the trunk never moves in the inner solve; its meta-gradient is Σ â ∇_trunk L_t at the
    solved heads (joint training). Finite setting: heads of each shape persist and are warm-started."""
    tasks, kinds = _cls_tasks(2)
    ts = TaskSet(tasks)
    fm = FiniteMultiHeadMMP(_cls_model(), ts, kinds, lam="shared", inner=SGD(lr=0.3, steps=5), outer_lr=1.0)
    w0 = [p.detach().clone() for p in fm.center()]
    fm.step()
    grads = [torch.zeros_like(p) for p in w0]
    for t, kd in enumerate(kinds):
        p = fm.task_params(t)
        for nm, w in zip(fm.names, w0, strict=True):
            torch.testing.assert_close(p["trunk." + nm], w)  # tied to the (old) center
        q = {k: v.clone().requires_grad_(k.startswith("trunk.")) for k, v in p.items()}
        out = torch.func.functional_call(fm.kinds[kd].fmodel.module, q, (tasks[t].x,))
        loss = nn.functional.cross_entropy(out, tasks[t].y)
        for acc, gr in zip(grads, torch.autograd.grad(loss, [q["trunk." + nm] for nm in fm.names]), strict=True):
            acc.add_(gr / len(kinds))
    for p, w, gr in zip(fm.center(), w0, grads, strict=True):
        torch.testing.assert_close(p, w - gr, atol=1e-6, rtol=1e-5)
    head_before = fm.task_params(1)["head.weight"].clone()
    assert head_before.shape == (5, 6) and fm.task_params(0)["head.weight"].shape == (3, 6)
    fm.step(monitor=False)
    after = fm.task_params(1)["head.weight"]
    assert not torch.equal(after, head_before) and float((after - head_before).norm()) < float(head_before.norm())


def test_encoders_of_different_input_widths_and_errors():
    g = torch.Generator().manual_seed(3)
    trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
    model = SharedTrunk(trunk, {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)},
                        encoders={"a": nn.Linear(3, 5), "b": nn.Linear(7, 5)})
    tasks = [Task(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)),
             Task(torch.randn(8, 7, generator=g), torch.randn(8, 2, generator=g))]
    learner = MultiHeadMMP(model, loss="mse", lam=1.0, inner=SGD(lr=0.1, steps=3))
    d = learner.step(tasks, where=["a", "b"])
    assert np.isfinite(d["meta_grad_norm"]) and d["meta_grad_norm"] > 0
    p = learner.adapt(tasks[1], where="b")
    assert p["encoder.weight"].shape == (5, 7) and learner.predict(p, tasks[1].x).shape == (8, 2)
    assert len(model.state_dict()) == 2 + 4 + 4  # every tensor once (members are not submodules)
    with pytest.raises(KeyError):
        learner.step(tasks, where=["a", "c"])
    with pytest.raises(ValueError):
        SharedTrunk(trunk, {"a": nn.Linear(4, 1)}, encoders={"z": nn.Linear(1, 5)})
    with pytest.raises(TypeError):
        MultiHeadMMP(trunk)  # type: ignore[arg-type]


def test_finite_multihead_weighted_tasks_reach_the_weighted_optimum():
    """Task weights with minibatches of 1 (shuffled epochs): the trunk bias averages to the w-weighted optimum 9
    (a batch-sum normaliser, as before, makes every batch of one task weigh the same and gives 5)."""
    from metaprox.tasks.taskset import TaskSampler

    ts = TaskSet([Task(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), y, dtype=torch.float64))
                  for y in (0.0, 10.0)], weights=[1.0, 9.0])
    torch.manual_seed(0)
    model = SharedTrunk(torch.nn.Linear(1, 1).to(torch.float64), {"k": torch.nn.Identity()})
    fm = FiniteMultiHeadMMP(model, ts, ["k", "k"], loss="mse", lam=2.0, inner=SGD(lr=0.2, steps=60),
                            sampler=TaskSampler(2, 1, seed=1), outer_lr=0.1)
    bias = []
    for _ in range(400):
        fm.step(monitor=False)
        bias.append(float(model.trunk.bias.detach()))
    assert abs(float(np.mean(bias[100:])) - 9.0) < 0.25


def test_the_one_step_reads_kinds_from_where_or_the_minibatch():
    """MultiHeadMMP's step is MetaLearner.step (its solve per kind): kinds given as where= or carried by a
    KindedTasks minibatch give bitwise the same update; a minibatch without kinds is refused naming them, and
    a flat learner refuses where= (it has one center)."""
    from metaprox import MetaMinibatchProx
    from metaprox.tasks.task import KindedTasks

    tasks, kinds = _cls_tasks(2)
    inner = SGD(lr=0.3, steps=4, batch_size=3)  # the step's pre-drawn inner minibatches reach every kind's solve
    a = MultiHeadMMP(_cls_model(), lam=0.7, inner=inner)
    b = MultiHeadMMP(_cls_model(), lam=0.7, inner=inner)
    for _ in range(2):
        a.step(tasks, where=kinds)
        b.step(KindedTasks(tasks, kinds))
    for p, q in zip(a.center(), b.center(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a.center()[0], _cls_model().trunk[0].weight)
    with pytest.raises(ValueError, match="needs each task's kind"):
        a.step(tasks)
    flat = MetaMinibatchProx(nn.Linear(4, 3), "cross_entropy")
    with pytest.raises(ValueError, match="one center, w"):
        flat.step(tasks[:1], where=["w3"])
