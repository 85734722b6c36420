"""Execution strategies agree; ragged tasks fall back; no graph survives an inner step."""

import weakref

import pytest
import torch

import metaprox
from metaprox.tasks.sine import SineFamily

STRATS = ["fused", "batched", "vmap", "loop"]


def _learner(strategy, loss="mse", sizes=(1, 16, 16, 1), steps=5, **kw):
    torch.manual_seed(0)
    model = metaprox.MLP(list(sizes)).double()
    return metaprox.MetaMinibatchProx(model, loss, lam=0.7, inner=metaprox.SGD(lr=0.05, steps=steps, **kw),
                                      outer_lr=0.5, execution=strategy)


def _sine(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [metaprox.Task(t.x.double(), t.y.double()) for t in SineFamily().sample(n, k, gen)]


def test_strategies_agree_on_parameters_and_diagnostics():
    tasks = _sine(6, 10)
    out = {}
    for s in STRATS:
        lr = _learner(s)
        diags = [lr.step(tasks) for _ in range(3)]
        out[s] = ([p.detach() for p in lr.model.parameters()], diags[-1])
    ref_p, ref_d = out["loop"]
    for s in STRATS:
        for a, b in zip(out[s][0], ref_p):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for k in ("meta_grad_norm", "inner_stationarity", "sigma2", "phi"):
            assert out[s][1][k] == pytest.approx(ref_d[k], rel=1e-9)


def test_strategies_agree_for_cross_entropy_and_momentum():
    g = torch.Generator().manual_seed(1)
    tasks = [metaprox.Task(torch.randn(12, 4, generator=g, dtype=torch.float64),
                           torch.randint(0, 3, (12,), generator=g)) for _ in range(4)]
    res = {}
    for s in STRATS:
        lr = _learner(s, "cross_entropy", sizes=(4, 8, 3), momentum=0.9)
        lr.step(tasks)
        res[s] = [p.detach() for p in lr.model.parameters()]
    for s in STRATS:
        for a, b in zip(res[s], res["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_custom_callable_loss_runs_batched_through_vmap():
    def huber(pred, y):
        return torch.nn.functional.huber_loss(pred, y)

    tasks = _sine(4, 8)
    res = {}
    for s in ["batched", "vmap", "loop"]:
        lr = _learner(s, huber)
        lr.step(tasks)
        res[s] = [p.detach() for p in lr.model.parameters()]
    for s in res:
        for a, b in zip(res[s], res["loop"]):
            torch.testing.assert_close(a, b)


def test_ragged_tasks_are_grouped_and_match_one_by_one():
    tasks = _sine(3, 10) + _sine(2, 7, seed=1) + _sine(1, 4, seed=2)
    lr = _learner("auto")
    groups = lr.execution.groups(tasks)
    assert sorted(map(len, groups)) == [1, 2, 3]
    solved = lr.solve(tasks)
    for s in solved:
        for j, i in enumerate(s.indices):
            (one,) = _learner("loop").solve([tasks[i]])
            for a, b in zip(one.result.params, s.result.params):
                torch.testing.assert_close(a[0], b[j])


def test_no_graph_survives_the_inner_solve():
    for s in STRATS:
        lr = _learner(s, steps=50)
        (group,) = lr.solve(_sine(3, 10))
        assert all(p.grad_fn is None and not p.requires_grad for p in group.result.params)


def test_inner_memory_does_not_grow_with_steps():
    """Tensors saved for backward that are still alive, at every save: bounded per step, not accumulated."""
    peaks = {}
    for steps in (2, 40):
        refs: list = []
        peak = 0

        def pack(t, refs=refs):
            nonlocal peak
            refs.append(weakref.ref(t))
            peak = max(peak, len({id(r()) for r in refs if r() is not None}))  # distinct live tensors
            return t

        lr = _learner("batched", steps=steps)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lr.solve(_sine(3, 10))
        assert len(refs) >= 5 * steps  # the hook really saw every step's graph
        peaks[steps] = peak
    assert peaks[2] == peaks[40]


def test_unknown_strategy_and_unsupported_batched_model():
    with pytest.raises(ValueError, match="unknown execution strategy"):
        _learner("threads")
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    conv(torch.zeros(1, 1, 5))
    lr = metaprox.MetaMinibatchProx(conv, "mse", lam=1.0, execution="batched")
    with pytest.raises(ValueError, match="execution 'batched' needs"):
        lr.step([metaprox.Task(torch.zeros(4, 1, 5), torch.zeros(4, 1))])
