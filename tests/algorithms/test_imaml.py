"""iMAML: the implicit meta-gradient matches the closed form on least-squares tasks; CG converges to it."""

from __future__ import annotations

import itertools

import pytest
import torch
from _helpers import DTYPE, flat, linear_tasks, meta_grad, sine_tasks, tiny_mlp
from torch import nn

import metaprox


def _linear(d: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(d, 1).to(DTYPE)


def _closed_form(model: nn.Linear, tasks, weights, lam: float) -> torch.Tensor:
    """Σ a_T (I + A_T/λ)⁻¹ ∇L_query(v_T*): A_T the exact Hessian of the support MSE, v_T* the exact prox.

    θ = [weight (d), bias]; L(θ) = mean((Xa θ − y)²) ⇒ A = (2/n) XaᵀXa, ∇L(θ) = (2/n) Xaᵀ(Xa θ − y).
    """
    c = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    out = torch.zeros_like(c)
    for a, t in zip(weights, tasks, strict=True):
        xa = torch.cat([t.x, torch.ones(len(t.x), 1, dtype=DTYPE)], 1)
        hess = 2.0 / len(t.x) * xa.T @ xa
        eye = torch.eye(len(c), dtype=DTYPE)
        v = torch.linalg.solve(hess + lam * eye, 2.0 / len(t.x) * xa.T @ t.y.reshape(-1) + lam * c)
        xq = torch.cat([t.x_query, torch.ones(len(t.x_query), 1, dtype=DTYPE)], 1)
        gq = 2.0 / len(t.x_query) * xq.T @ (xq @ v - t.y_query.reshape(-1))
        out += a * torch.linalg.inv(eye + hess / lam) @ gq
    return out


@pytest.mark.parametrize("execution", ["batched", "vmap", "loop"])
def test_matches_explicit_inverse_and_cg_converges(execution):
    tasks, weights, lam, dim = linear_tasks(3), [0.2, 0.5, 0.3], 0.3, 5
    truth = _closed_form(_linear(), tasks, weights, lam)
    errors = []
    for cg in range(1, dim + 3):
        im = metaprox.IMAML(_linear(), "mse", lam=lam, inner=metaprox.ExactLeastSquares(), cg_steps=cg,
                            execution=execution)
        errors.append(float((flat(meta_grad(im, tasks, weights)) - truth).norm() / truth.norm()))
    assert errors[0] > 1e-2  # one CG step is not enough on this spectrum: the test is not trivial
    assert all(e <= 1e-9 for e in errors[dim - 1:]), errors  # exact at cg_steps ≥ dim (5 parameters)


def test_cg_error_decreases_monotonically_per_task():
    # CG's Euclidean error is monotone for each system (Hestenes & Stiefel 1952, Thm 6:3): use one task
    (task,) = linear_tasks(1, seed=3)
    lam = 0.3
    truth = _closed_form(_linear(), [task], [1.0], lam)
    errors = []
    for k in range(1, 6):
        im = metaprox.IMAML(_linear(), "mse", lam=lam, cg_steps=k, inner=metaprox.ExactLeastSquares())
        errors.append(float((flat(meta_grad(im, [task])) - truth).norm()))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-10 * truth.norm()


def test_per_group_lambda_matches_implicit_function_theorem():
    # Λ (H + Λ)⁻¹ ∇L_query with Λ = diag(λ_weight, ..., λ_bias)
    tasks, lams = linear_tasks(2), {"weight": 0.4, "bias": 2.0}
    model = _linear()
    im = metaprox.IMAML(model, "mse", lam=lams, inner=metaprox.ExactLeastSquares(), cg_steps=5)
    c = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    big = torch.diag(torch.tensor([0.4] * 4 + [2.0], dtype=DTYPE))
    truth = torch.zeros_like(c)
    for t in tasks:
        xa = torch.cat([t.x, torch.ones(len(t.x), 1, dtype=DTYPE)], 1)
        hess = 2.0 / len(t.x) * xa.T @ xa
        v = torch.linalg.solve(hess + big, 2.0 / len(t.x) * xa.T @ t.y.reshape(-1) + big @ c)
        xq = torch.cat([t.x_query, torch.ones(len(t.x_query), 1, dtype=DTYPE)], 1)
        gq = 2.0 / len(xq) * xq.T @ (xq @ v - t.y_query.reshape(-1))
        truth += 0.5 * big @ torch.linalg.solve(hess + big, gq)
    torch.testing.assert_close(flat(meta_grad(im, tasks)), truth, rtol=1e-9, atol=1e-12)


def test_same_inner_solution_as_mmp():
    tasks, sgd = sine_tasks(4), metaprox.SGD(lr=0.05, steps=10)
    mmp = metaprox.MetaMinibatchProx(tiny_mlp(), "mse", lam=0.8, inner=sgd, seed=3)
    im = metaprox.IMAML(tiny_mlp(), "mse", lam=0.8, inner=sgd, seed=3)
    (a,) = mmp.solve(tasks)
    (b,) = im.solve(tasks)
    for x, y in zip(a.result.params, b.result.params, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.result.stationarity, b.result.stationarity)


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="λ > 0"):
        metaprox.IMAML(tiny_mlp(), "mse", lam=None)
    with pytest.raises(ValueError, match="cg_steps"):
        metaprox.IMAML(tiny_mlp(), "mse", cg_steps=0)
    with pytest.raises(ValueError, match="query set"):
        metaprox.IMAML(tiny_mlp(), "mse").step(sine_tasks(2, query=False))
