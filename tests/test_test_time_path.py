"""One test-time path: ``adapt``, ``adaptation_curve``, periodic validation and ``metaprox eval`` give the same
answer for the same task — with carried Adam moments (read at test time) and with a tree's nodes."""

import json

import pytest
import torch

import metaprox
from metaprox.build import build_family, build_inner
from metaprox.config import resolve
from metaprox.evaluate import PeriodicValidation, adaptation_curve, evaluate_run
from metaprox.rundir import load_learner
from metaprox.train import train


def _cfg(carry: bool) -> dict:
    return resolve({"outer": {"steps": 6, "meta_batch": 3}, "task": {"train_points": 10},
                    "inner": {"solver": "adam", "lr": 0.01, "beta1": 0.0, "steps": 3, "carry_moments": carry},
                    "log": {"every": 3, "checkpoint_every": 3, "tensorboard": "false", "progress": False,
                            "eval_every": 3, "eval_tasks": 3},
                    "eval": {"tasks": 4, "points": 20, "steps": [0, 2, 5], "shots": [5], "lr": 0.02}})


def _adapt_losses(learner, cfg, tasks, steps):
    """Mean query MSE of ``learner.adapt`` (one task at a time) with the evaluation's solver."""
    e = cfg["eval"]
    inner = build_inner(cfg, lr=e["lr"], batch_size=e["batch_size"])
    out = []
    for t in tasks:
        params = learner.adapt(t, steps=steps, lam=e["lam"], inner=inner)
        with torch.no_grad():
            out.append(float(learner.loss.single(learner.predict(params, t.x_query), t.y_query)))
    return sum(out) / len(out)


@pytest.mark.parametrize("carry", [True, False])
def test_adapt_curve_validation_and_eval_agree(tmp_path, carry):
    cfg = _cfg(carry)
    run = tmp_path / "run"
    result = train(cfg, run, evaluate=True)
    learner, _, _ = load_learner(run)
    assert (learner.inner_moments is not None) == carry
    test_tasks = build_family(cfg).eval_sets("test")["5-shot"]
    for k in (2, 5):
        want = _adapt_losses(learner, cfg, test_tasks, k)
        assert result["sets"]["5-shot"][str(k)]["loss"] == pytest.approx(want, rel=1e-5)
        again = evaluate_run(run, write=False)  # `metaprox eval` from the run directory
        assert again["sets"]["5-shot"][str(k)]["loss"] == pytest.approx(want, rel=1e-5)
        curve = adaptation_curve(learner, test_tasks, 5, inner=build_inner(cfg, lr=0.02))
        assert float(curve.loss[k].mean()) == pytest.approx(want, rel=1e-5)
    # periodic validation at the last step = adapt on the same validation tasks
    rows = [json.loads(line) for line in (run / "val_curve.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 6
    val_tasks = PeriodicValidation(cfg).sets["5-shot"]
    assert last["sets"]["5-shot"]["5"] == pytest.approx(_adapt_losses(learner, cfg, val_tasks, 5), rel=1e-5)
    if carry:  # the moments matter: adapting with fresh moments gives another answer
        fresh = metaprox.Adam(lr=0.02, steps=5, beta1=0.0)
        p = learner.adapt(test_tasks[0], inner=fresh)
        q = learner.adapt(test_tasks[0], inner=build_inner(cfg, lr=0.02).with_steps(5))
        assert not torch.allclose(next(iter(p.values())), next(iter(q.values())))


def test_tree_nodes_reach_the_curve(lin_tasks):
    """A hierarchical learner's curve adapts each task from its node, as ``adapt(task, group)`` does."""
    model = torch.nn.Linear(3, 1).to(torch.float64)
    hm = metaprox.HierarchicalMMP(model, "mse", lam=2.0, lam_group=1.0,
                                  inner=metaprox.SGD(lr=0.05, steps=4), outer_lr=0.5)
    tasks = [metaprox.Task(t.x[:6], t.y[:6], t.x[6:], t.y[6:]) for t in lin_tasks]
    groups = ["a", "a", "b", "new"]
    for _ in range(3):
        hm.step(tasks[:3], where=groups[:3])
    curve = adaptation_curve(hm, tasks, 4, where=groups)
    for i, (t, g) in enumerate(zip(tasks, groups, strict=True)):
        p = hm.adapt(t, where=g)
        with torch.no_grad():
            want = float(hm.loss.single(hm.predict(p, t.x_query), t.y_query))
        assert float(curve.loss[4, i]) == pytest.approx(want, rel=1e-12)
