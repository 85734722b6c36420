"""MAML: the meta-gradient is the exact gradient of the post-adaptation query loss (finite differences)."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPE, flat, meta_grad, sine_tasks, tiny_mlp
from torch.func import functional_call

import metaprox


def _post_adaptation_query_loss(model, names, w_flat, tasks, weights, lr, steps, lam):
    """Reference written independently of metaprox: unroll plain GD per task, return Σ a_T L_query(v_T)."""
    shapes = [p.shape for p in model.parameters()]
    w, i = [], 0
    for s in shapes:
        w.append(w_flat[i:i + s.numel()].view(s))
        i += s.numel()
    total = torch.zeros((), dtype=DTYPE)
    for a, t in zip(weights, tasks, strict=True):
        v = [p.clone().requires_grad_(True) for p in w]
        for _ in range(steps):
            out = functional_call(model, dict(zip(names, v, strict=True)), (t.x,))
            g = torch.autograd.grad(((out - t.y) ** 2).mean(), v)
            v = [(vi - lr * (gi + (lam or 0.0) * (vi - wi))).detach().requires_grad_(True)
                 for vi, gi, wi in zip(v, g, w, strict=True)]
        with torch.no_grad():
            pred = functional_call(model, dict(zip(names, v, strict=True)), (t.x_query,))
            total += a * ((pred - t.y_query) ** 2).mean()
    return total


@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
@pytest.mark.parametrize("lam", [None, 0.7])
def test_meta_gradient_equals_finite_differences(execution, lam):
    model = tiny_mlp((1, 3, 1))
    tasks, weights = sine_tasks(3), [0.5, 0.2, 0.3]
    lr, steps = 0.05, 3
    maml = metaprox.MAML(model, "mse", inner=metaprox.SGD(lr=lr, steps=steps), lam=lam, execution=execution)
    g = flat(meta_grad(maml, tasks, weights))
    names = [n for n, _ in model.named_parameters()]
    w0 = flat([p.detach() for p in model.parameters()])
    eps, fd = 1e-6, torch.zeros_like(w0)
    for j in range(w0.numel()):
        e = torch.zeros_like(w0)
        e[j] = eps
        up = _post_adaptation_query_loss(model, names, w0 + e, tasks, weights, lr, steps, lam)
        down = _post_adaptation_query_loss(model, names, w0 - e, tasks, weights, lr, steps, lam)
        fd[j] = (up - down) / (2 * eps)
    # central differences in float64: truncation O(eps²·f''') plus round-off O(1e-16/eps) ≈ 1e-9
    torch.testing.assert_close(g, fd, rtol=0, atol=1e-7)
    assert g.norm() > 1e-2  # not trivially zero


def test_second_order_differs_from_first_order_and_first_order_is_fomaml():
    tasks = sine_tasks(3)
    sgd = metaprox.SGD(lr=0.05, steps=5)
    g2 = flat(meta_grad(metaprox.MAML(tiny_mlp(), "mse", inner=sgd), tasks))
    g1 = flat(meta_grad(metaprox.MAML(tiny_mlp(), "mse", inner=sgd, first_order=True), tasks))
    gf = flat(meta_grad(metaprox.FOMAML(tiny_mlp(), "mse", inner=sgd), tasks))
    torch.testing.assert_close(g1, gf, rtol=1e-12, atol=1e-12)
    assert (g2 - g1).norm() > 1e-3 * g2.norm()


def test_zero_inner_steps_is_query_gradient_at_the_prior():
    tasks = sine_tasks(2)
    model = tiny_mlp()
    g = meta_grad(metaprox.MAML(model, "mse", inner=metaprox.SGD(lr=0.05, steps=0)), tasks)
    ref = [torch.zeros_like(p) for p in model.parameters()]
    for t in tasks:
        model.zero_grad()
        (0.5 * ((model(t.x_query) - t.y_query) ** 2).mean()).backward()
        ref = [r + p.grad for r, p in zip(ref, model.parameters(), strict=True)]
    torch.testing.assert_close(flat(g), flat(ref), rtol=1e-12, atol=1e-12)


def test_step_updates_and_adapt_predict_state_roundtrip():
    tasks = sine_tasks(4)
    maml = metaprox.MAML(tiny_mlp(), "mse", inner=metaprox.SGD(lr=0.05, steps=2), outer_lr=0.01)
    diag = maml.step(tasks)
    assert diag["step"] == 1 and diag["inner_loss"] > 0
    params = maml.adapt(tasks[0])
    assert maml.predict(params, tasks[0].x_query).shape == tasks[0].y_query.shape
    other = metaprox.MAML(tiny_mlp(seed=1), "mse", inner=metaprox.SGD(lr=0.05, steps=2), outer_lr=0.01)
    other.load_state_dict(maml.state_dict())
    torch.testing.assert_close(flat(other.center()), flat(maml.center()))


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="query set"):
        metaprox.MAML(tiny_mlp(), "mse").step(sine_tasks(2, query=False))
    with pytest.raises(ValueError, match="plain full-batch gradient descent"):
        metaprox.MAML(tiny_mlp(), "mse", inner=metaprox.SGD(momentum=0.9))
    with pytest.raises(ValueError, match="plain full-batch gradient descent"):
        metaprox.MAML(tiny_mlp(), "mse", inner=metaprox.Adam())
    with pytest.raises(ValueError, match="inner_data='support'"):
        metaprox.MAML(tiny_mlp(), "mse", inner_data="support+query")
