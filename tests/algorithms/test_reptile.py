"""Reptile: the displacement rule, its one-step identity with joint training, and the penalty-free inner."""

from __future__ import annotations

import pytest
import torch
from _helpers import flat, meta_grad, sine_tasks, tiny_mlp

import metaprox


def _task_gradient(model, x, y) -> torch.Tensor:
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return flat([p.grad for p in model.parameters()])


def test_one_inner_step_is_a_joint_training_gradient():
    # v = w − α∇L_T(w) ⇒ (w − v)/α = ∇L_T(w): with M = 1 Reptile is SGD on Σ_T a_T L_T (Nichol et al., §5)
    tasks, weights = sine_tasks(3, query=False), [0.1, 0.6, 0.3]
    model = tiny_mlp()
    g = flat(meta_grad(metaprox.Reptile(model, "mse", inner=metaprox.SGD(lr=0.07, steps=1)), tasks, weights))
    joint = sum(a * _task_gradient(model, t.x, t.y) for a, t in zip(weights, tasks, strict=True))
    torch.testing.assert_close(g, joint, rtol=1e-10, atol=1e-12)


def test_many_steps_is_normalised_displacement_of_plain_fine_tuning():
    tasks, lr, steps = sine_tasks(2, query=False), 0.03, 7
    model = tiny_mlp()
    g = flat(meta_grad(metaprox.Reptile(model, "mse", inner=metaprox.SGD(lr=lr, steps=steps)), tasks))
    w0 = flat([p.detach().clone() for p in model.parameters()])
    vbar = torch.zeros_like(w0)
    for t in tasks:  # reference fine-tuning: no penalty toward w
        ref = tiny_mlp()
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            ((ref(t.x) - t.y) ** 2).mean().backward()
            opt.step()
        vbar += 0.5 * flat([p.detach() for p in ref.parameters()])
    torch.testing.assert_close(g, (w0 - vbar) / (lr * steps), rtol=1e-9, atol=1e-12)


def test_outer_sgd_step_moves_toward_the_mean_solution():
    # SGD with lr β = ε·α·M gives the paper's w ← w + ε(v̄ − w)
    tasks, eps, sgd = sine_tasks(3, query=False), 0.5, metaprox.SGD(lr=0.02, steps=5)
    rep = metaprox.Reptile(tiny_mlp(), "mse", inner=sgd, outer_lr=eps * 0.02 * 5)
    w0 = flat(rep.center())
    (group,) = rep.solve(tasks)
    vbar = flat([v.mean(0) for v in group.result.params])
    rep.step(tasks)
    torch.testing.assert_close(flat(rep.center()), w0 + eps * (vbar - w0), rtol=1e-9, atol=1e-12)


def test_noprox_penalty_is_exactly_zero():
    p = metaprox.NoProx(["a", "b"])
    v, c = [torch.ones(2, 3), torch.ones(2, 1)], [torch.zeros(3), torch.zeros(1)]
    g = [torch.full((2, 3), 5.0), torch.full((2, 1), 5.0)]
    p.add_grad_v_(g, v, c)
    assert all(bool((t == 5).all()) for t in g)
    assert bool((p.value(v, c) == 0).all()) and all(bool((t == 0).all()) for t in p.grad_c(v, c))
    torch.testing.assert_close(p.sqdist(v, c), torch.tensor([4.0, 4.0]))


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="learning rate"):
        metaprox.Reptile(torch.nn.Linear(2, 1), "mse", inner=metaprox.ExactLeastSquares())
    with pytest.raises(ValueError, match="steps ≥ 1"):
        metaprox.Reptile(tiny_mlp(), "mse", inner=metaprox.SGD(steps=0))
