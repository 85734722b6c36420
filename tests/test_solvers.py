"""Inner solvers against the closed-form prox solution of quadratic (linear least-squares) tasks."""

import pytest
import torch

import metaprox
from conftest import linear_model, linear_tasks, quad_terms, theta
from metaprox.execution import Execution, FunctionalModel
from metaprox.losses import resolve_loss
from metaprox.prox import SquaredL2
from metaprox.solvers import ProxProblem


def _problem(model, tasks, lam, strategy="auto"):
    fm = FunctionalModel(model)
    ex = Execution(fm, resolve_loss("mse"), strategy)
    x, y = ex.stack(tasks)
    center = [p.detach() for p in fm.params()]
    return ProxProblem(ex.oracle(x, y), SquaredL2(lam, fm.names), center), fm


def _closed_form(task, center_theta, lam):
    a, b = quad_terms(task)
    return torch.linalg.solve(a + lam * torch.eye(len(b), dtype=a.dtype), b + lam * center_theta)


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_exact_least_squares_matches_closed_form(lam):
    tasks, model = linear_tasks(), linear_model()
    prob, fm = _problem(model, tasks, lam)
    res = metaprox.ExactLeastSquares().solve(prob)
    c = theta(dict(zip(fm.names, prob.center, strict=True)))
    for i, t in enumerate(tasks):
        got = theta({n: p[i] for n, p in zip(fm.names, res.params, strict=True)})
        torch.testing.assert_close(got, _closed_form(t, c, lam), rtol=1e-10, atol=1e-10)
    assert float(res.stationarity.max()) < 1e-10


def test_exact_least_squares_per_group_lambda():
    tasks, model = linear_tasks(), linear_model()
    lam = {"weight": 2.0, "bias": 0.3}
    prob, fm = _problem(model, tasks, lam)
    res = metaprox.ExactLeastSquares().solve(prob)
    a, b = quad_terms(tasks[0])
    lam_diag = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.3], dtype=torch.float64))
    c = theta(dict(zip(fm.names, prob.center, strict=True)))
    want = torch.linalg.solve(a + lam_diag, b + lam_diag @ c)
    torch.testing.assert_close(theta({n: p[0] for n, p in zip(fm.names, res.params, strict=True)}), want)


@pytest.mark.parametrize("solver,tol", [
    (metaprox.SGD(lr=0.05, steps=3000), 1e-6),
    (metaprox.SGD(lr=0.02, steps=1500, momentum=0.9), 1e-6),
    (metaprox.SGD(lr=0.02, steps=1500, momentum=0.9, nesterov=True), 1e-6),
    (metaprox.Adam(lr=0.02, steps=4000), 1e-6),
    # β1 = 0 (the paper's classification recipe) is RMSProp-like: with a constant lr it hovers at O(lr)
    (metaprox.Adam(lr=0.002, steps=4000, beta1=0.0), 2e-3),
])
def test_iterative_solvers_converge_to_the_prox_point(solver, tol):
    tasks, model = linear_tasks(), linear_model()
    prob, fm = _problem(model, tasks, 1.0)
    res = solver.solve(prob)
    c = theta(dict(zip(fm.names, prob.center, strict=True)))
    for i, t in enumerate(tasks):
        got = theta({n: p[i] for n, p in zip(fm.names, res.params, strict=True)})
        torch.testing.assert_close(got, _closed_form(t, c, 1.0), rtol=tol, atol=tol)
    assert float(res.stationarity.max()) < 10 * tol


def test_stationarity_is_the_residual_norm():
    tasks, model = linear_tasks(), linear_model()
    prob, fm = _problem(model, tasks, 0.7)
    res = metaprox.SGD(lr=0.01, steps=3).solve(prob)
    a, b = quad_terms(tasks[1])
    v = theta({n: p[1] for n, p in zip(fm.names, res.params, strict=True)})
    c = theta(dict(zip(fm.names, prob.center, strict=True)))
    want = torch.linalg.norm(a @ v - b + 0.7 * (v - c))
    torch.testing.assert_close(res.stationarity[1], want)


def test_minibatch_sgd_is_seeded_and_differs_from_full_batch():
    tasks, model = linear_tasks(n=20), linear_model()
    prob, _ = _problem(model, tasks, 1.0)
    s = metaprox.SGD(lr=0.05, steps=5, batch_size=4)
    a = s.solve(prob, generator=torch.Generator().manual_seed(1)).params
    b = s.solve(prob, generator=torch.Generator().manual_seed(1)).params
    full = metaprox.SGD(lr=0.05, steps=5).solve(prob).params
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.allclose(a[0], full[0])


def test_exact_solver_rejects_nonlinear_models():
    prob, _ = _problem(metaprox.MLP([3, 4, 1]).double(), linear_tasks(), 1.0)
    with pytest.raises(ValueError, match="needs a linear model"):
        metaprox.ExactLeastSquares().solve(prob)


def test_solver_argument_errors():
    prob, _ = _problem(linear_model(), linear_tasks(), 1.0)
    with pytest.raises(ValueError, match="inner learning rate must be > 0"):
        metaprox.SGD(lr=0.0).solve(prob)
    with pytest.raises(ValueError, match="betas"):
        metaprox.Adam(beta1=1.0).solve(prob)
