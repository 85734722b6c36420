"""Every rule on the same fixtures: execution strategies agree, registry, and first-order memory is flat."""

from __future__ import annotations

import pytest
import torch
from _helpers import SavedTensorPeak, flat, meta_grad, sine_tasks, tiny_mlp

import metaprox

SGD = metaprox.SGD(lr=0.05, steps=4)
RULES = {
    "mmp": lambda m, **kw: metaprox.MetaMinibatchProx(m, "mse", lam=0.8, inner=SGD, **kw),
    "maml": lambda m, **kw: metaprox.MAML(m, "mse", inner=SGD, **kw),
    "maml_first_order": lambda m, **kw: metaprox.MAML(m, "mse", inner=SGD, first_order=True, **kw),
    "fomaml": lambda m, **kw: metaprox.FOMAML(m, "mse", inner=SGD, **kw),
    "reptile": lambda m, **kw: metaprox.Reptile(m, "mse", inner=SGD, **kw),
    "imaml": lambda m, **kw: metaprox.IMAML(m, "mse", lam=0.8, inner=SGD, cg_steps=3, **kw),
}


def test_registry_names_every_rule():
    assert set(metaprox.ALGORITHMS) == {"mmp", "maml", "fomaml", "reptile", "imaml"}
    for cls in metaprox.ALGORITHMS.values():
        assert issubclass(cls, metaprox.MetaLearner)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_batched_vmap_loop_agree(rule):
    tasks, weights = sine_tasks(3), [0.2, 0.3, 0.5]
    grads = {ex: flat(meta_grad(RULES[rule](tiny_mlp(), execution=ex), tasks, weights))
             for ex in ("batched", "vmap", "loop")}
    assert grads["batched"].norm() > 0
    torch.testing.assert_close(grads["vmap"], grads["batched"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["loop"], grads["batched"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_step_runs_with_monitors_and_ragged_tasks(rule):
    tasks = sine_tasks(2) + sine_tasks(1, k=7, seed=1)  # two shape groups
    learner = RULES[rule](tiny_mlp(), outer_lr=0.01)
    before = flat(learner.center())
    diag = learner.step(tasks)
    assert {"meta_grad_norm", "inner_loss", "inner_stationarity", "sigma2"} <= set(diag)
    assert not torch.equal(before, flat(learner.center()))


def _peak_saved_bytes(rule: str, steps: int) -> int:
    sgd = metaprox.SGD(lr=0.05, steps=steps)
    kw = {"inner": sgd, "execution": "batched"}
    learner = {"mmp": lambda: metaprox.MetaMinibatchProx(tiny_mlp((1, 16, 16, 1)), lam=0.8, **kw),
               "maml": lambda: metaprox.MAML(tiny_mlp((1, 16, 16, 1)), **kw),
               "maml_first_order": lambda: metaprox.MAML(tiny_mlp((1, 16, 16, 1)), first_order=True, **kw),
               "fomaml": lambda: metaprox.FOMAML(tiny_mlp((1, 16, 16, 1)), **kw),
               "reptile": lambda: metaprox.Reptile(tiny_mlp((1, 16, 16, 1)), **kw),
               "imaml": lambda: metaprox.IMAML(tiny_mlp((1, 16, 16, 1)), lam=0.8, cg_steps=3, **kw)}[rule]()
    tasks = sine_tasks(4, k=10, kq=10)
    with SavedTensorPeak() as tracker:
        learner.step(tasks)
    assert tracker.live == 0  # every graph was freed
    return tracker.peak


@pytest.mark.parametrize("rule", ["mmp", "fomaml", "reptile", "imaml", "maml_first_order"])
def test_first_order_memory_does_not_grow_with_inner_steps(rule):
    # learn2learn's test_memory_consumption idea, measured deterministically as the peak of saved activations
    assert _peak_saved_bytes(rule, 1) == _peak_saved_bytes(rule, 25) > 0


def test_second_order_maml_memory_grows_with_inner_steps():
    p1, p5, p25 = (_peak_saved_bytes("maml", m) for m in (1, 5, 25))
    assert p1 < p5 < p25 and p25 > 10 * p1  # linear in the number of unrolled steps
