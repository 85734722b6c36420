"""MMP against ground truth: Lemma 1, the closed-form meta-optimum of quadratic tasks, the paper's outer rule."""

import pytest
import torch

import metaprox
from conftest import linear_model, linear_tasks, quad_terms, theta


def _meta_optimum(tasks, lam):
    """argmin_w mean_T φ_T(w) for quadratic tasks: ∇φ_T(w) = λA(A+λI)⁻¹w − λ(A+λI)⁻¹b."""
    m_sum, r_sum = 0, 0
    for t in tasks:
        a, b = quad_terms(t)
        inv = torch.linalg.inv(a + lam * torch.eye(len(b), dtype=a.dtype))
        m_sum = m_sum + lam * a @ inv
        r_sum = r_sum + lam * inv @ b
    return torch.linalg.solve(m_sum, r_sum)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_mmp_with_exact_inner_converges_to_closed_form_meta_optimum(lam):
    tasks, model = linear_tasks(n_tasks=5), linear_model()
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=lam, inner=metaprox.ExactLeastSquares(),
                                     outer_lr=1.0 / lam, schedule="constant")
    for _ in range(400):
        mmp.step(tasks)
    got = theta(dict(model.named_parameters())).detach()
    torch.testing.assert_close(got, _meta_optimum(tasks, lam), rtol=1e-9, atol=1e-9)


def test_outer_lr_one_over_lambda_moves_w_to_the_mean_prox_solution():
    tasks, model = linear_tasks(), linear_model()
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=0.8, inner=metaprox.ExactLeastSquares(),
                                     outer_lr=1 / 0.8, schedule="constant")
    (group,) = mmp.solve(tasks)
    mean_v = [p.mean(0) for p in group.result.params]
    mmp.step(tasks)
    for p, v in zip(model.parameters(), mean_v, strict=True):
        torch.testing.assert_close(p.detach(), v)


def test_task_weights_give_the_weighted_mean():
    tasks, model = linear_tasks(n_tasks=3), linear_model()
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=1.0, inner=metaprox.ExactLeastSquares(),
                                     outer_lr=1.0, schedule="constant")
    (group,) = mmp.solve(tasks)
    weights = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)
    want = [torch.tensordot(weights / 4, p, dims=1) for p in group.result.params]
    mmp.step(tasks, weights=weights)
    for p, v in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), v)
    with pytest.raises(ValueError, match="not all zero"):
        mmp.step(tasks, weights=[0, 0, 0])


def _phi(model, task, w_flat, lam, names):
    """φ_T(w) with an accurate inner solve (float64 SGD to stationarity ≈ 1e-12)."""
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w_flat, model.parameters())
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=lam, inner=metaprox.SGD(lr=0.05, steps=4000))
    (group,) = mmp.solve([task])
    assert float(group.result.stationarity) < 1e-10
    v = [p for p in group.result.params]
    w = [p.detach() for p in model.parameters()]
    return float(group.result.loss + mmp.prox.value(v, w)), [t[0] for t in v]


def test_lemma1_envelope_gradient_equals_finite_differences():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    task = metaprox.Task(x, torch.sin(x[:, :1]) + x[:, 1:] ** 2)
    lam = 4.0
    names = [n for n, _ in model.named_parameters()]
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    _, v = _phi(model, task, w0, lam, names)
    lemma = lam * (w0 - torch.cat([t.flatten() for t in v]))
    g = torch.Generator().manual_seed(0)
    h = 1e-5
    for _ in range(3):
        d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
        fd = (_phi(model, task, w0 + h * d, lam, names)[0] - _phi(model, task, w0 - h * d, lam, names)[0]) / (2 * h)
        assert abs(fd - float(lemma @ d)) < 1e-6 * max(1.0, abs(fd))


def test_meta_gradient_is_written_to_grad_for_any_torch_optimizer():
    tasks, model = linear_tasks(), linear_model()
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen["grads"] = [p.grad.clone() for g in self.param_groups for p in g["params"]]
            return super().step(closure)

    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=2.0, inner=metaprox.ExactLeastSquares(),
                                     meta_optimizer=lambda p: Spy(p, lr=0.1))
    (group,) = mmp.solve(tasks)
    w = [p.detach().clone() for p in model.parameters()]
    mmp.step(tasks)
    for gr, wi, v in zip(seen["grads"], w, group.result.params, strict=True):
        torch.testing.assert_close(gr, 2.0 * (wi - v.mean(0)))


def test_default_schedule_is_the_papers_linear_decay():
    model = linear_model()
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=1.0, inner=metaprox.ExactLeastSquares(), outer_lr=0.8,
                                     total_steps=10)
    lrs = [mmp.step(linear_tasks())["lr"] for _ in range(10)]
    assert lrs == pytest.approx([0.8 * (1 - s / 10) for s in range(10)])


def test_adapt_and_predict_use_the_prox_problem_at_the_prior():
    tasks, model = linear_tasks(), linear_model()
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=0.3, inner=metaprox.ExactLeastSquares())
    params = mmp.adapt(tasks[0])
    a, b = quad_terms(tasks[0])
    c = theta(dict(model.named_parameters())).detach()
    want = torch.linalg.solve(a + 0.3 * torch.eye(4, dtype=a.dtype), b + 0.3 * c)
    torch.testing.assert_close(theta(params), want)
    torch.testing.assert_close(mmp.predict(params, tasks[0].x), tasks[0].x @ params["weight"].T + params["bias"])


def test_nonfinite_loss_stops_without_touching_parameters():
    model = metaprox.MLP([1, 8, 1])
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=1.0, inner=metaprox.SGD(lr=1e6, steps=20))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.linspace(-5, 5, 10).view(-1, 1)
    with pytest.raises(metaprox.NonFiniteError, match="non-finite"):
        for _ in range(5):
            mmp.step([metaprox.Task(x, 100 * x)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_inexact_inner_solve_warns():
    model = metaprox.MLP([1, 16, 1])
    mmp = metaprox.MetaMinibatchProx(model, "mse", lam=0.01, inner=metaprox.SGD(lr=1e-4, steps=1))
    x = torch.linspace(-5, 5, 20).view(-1, 1)
    with pytest.warns(metaprox.InexactInnerSolveWarning, match="far from solved"):
        mmp.step([metaprox.Task(x, 3 * torch.sin(x))])
