"""``Adam(carry_moments=True)``: Adam's moments persist across inner problems (Reptile's and the MMP paper's TF
code), checked against ``torch.optim.Adam`` whose state is kept while the weights are reset to the prior."""

import copy

import pytest
import torch
import torch.nn.functional as F

import metaprox
from conftest import linear_model, linear_tasks
from metaprox.algorithms.finite import FiniteMMP
from metaprox.build import build_inner
from metaprox.checkpoint import load_checkpoint
from metaprox.config import ConfigError, resolve
from metaprox.train import train

LAM, LR, STEPS, OUTER = 0.7, 0.05, 4, 0.3


def _reference_inner(center, task, state, lam=LAM):
    """``STEPS`` torch.optim.Adam steps on the prox objective (pull ``lam``) from ``center``, starting from
    ``state``."""
    w, b = (t.clone().requires_grad_(True) for t in center)
    opt = torch.optim.Adam([w, b], lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    if state is not None:
        for p, m, s in zip((w, b), state["m"], state["s"], strict=True):
            opt.state[p] = {"step": torch.tensor(float(state["t"])), "exp_avg": m.clone(), "exp_avg_sq": s.clone()}
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(task.x @ w.T + b, task.y)
        loss = loss + lam / 2 * sum((p - c).square().sum() for p, c in zip((w, b), center, strict=True))
        loss.backward()
        opt.step()
    st = [opt.state[p] for p in (w, b)]
    return [w.detach(), b.detach()], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], int(st[0]["step"])


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_moments_carry_across_tasks_and_outer_steps_like_one_torch_adam(strategy):
    tasks = linear_tasks(n_tasks=6)
    model = linear_model()
    ln = metaprox.MetaMinibatchProx(model, "mse", lam=LAM, outer_lr=OUTER, execution=strategy,
                                    inner=metaprox.Adam(lr=LR, steps=STEPS, beta1=0.9, carry_moments=True))
    state = None
    for s in range(3):
        batch = tasks[2 * s: 2 * s + 2]
        center = [p.detach().clone() for p in model.parameters()]
        runs = [_reference_inner(center, t, state) for t in batch]
        ln.step(batch, monitor=False)
        # the prior moves along the mean envelope gradient; the moments become the tasks' mean final moments
        v_bar = [sum(r[0][i] for r in runs) / 2 for i in range(2)]
        for p, c, v in zip(model.parameters(), center, v_bar, strict=True):
            torch.testing.assert_close(p.detach(), c - OUTER * LAM * (c - v), rtol=1e-12, atol=1e-12)
        state = {"m": [sum(r[1][i] for r in runs) / 2 for i in range(2)],
                 "s": [sum(r[2][i] for r in runs) / 2 for i in range(2)], "t": runs[0][3]}
        assert ln.inner_moments.t == state["t"] == STEPS * (s + 1)
        for got, want in zip(ln.inner_moments.m + ln.inner_moments.s, state["m"] + state["s"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_reptile_carries_the_moments_too():
    """Reptile (no pull): w moves by outer_lr·(w − v̄)/(α·M), and the moments become the tasks' mean final moments
    (its meta-gradient came back as a tuple, which the moment all-reduce could not extend: a TypeError)."""
    tasks = linear_tasks(n_tasks=4)
    model = linear_model()
    ln = metaprox.Reptile(model, "mse", outer_lr=OUTER, inner=metaprox.Adam(lr=LR, steps=STEPS, beta1=0.9,
                                                                           carry_moments=True))
    state = None
    for s in range(2):
        batch = tasks[2 * s: 2 * s + 2]
        center = [p.detach().clone() for p in model.parameters()]
        runs = [_reference_inner(center, t, state, lam=0.0) for t in batch]
        ln.step(batch, monitor=False)
        v_bar = [sum(r[0][i] for r in runs) / 2 for i in range(2)]
        for p, c, v in zip(model.parameters(), center, v_bar, strict=True):
            torch.testing.assert_close(p.detach(), c - OUTER * (c - v) / (LR * STEPS), rtol=1e-12, atol=1e-12)
        state = {"m": [sum(r[1][i] for r in runs) / 2 for i in range(2)],
                 "s": [sum(r[2][i] for r in runs) / 2 for i in range(2)], "t": runs[0][3]}
        for got, want in zip(ln.inner_moments.m + ln.inner_moments.s, state["m"] + state["s"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_adaptation_reads_the_moments_and_leaves_them_alone():
    tasks = linear_tasks(n_tasks=3)
    model = linear_model()
    ln = metaprox.MetaMinibatchProx(model, "mse", lam=LAM, outer_lr=OUTER,
                                    inner=metaprox.Adam(lr=LR, steps=STEPS, beta1=0.9, carry_moments=True))
    ln.step(tasks[:2], monitor=False)
    before = copy.deepcopy(ln.inner_moments)
    center = [p.detach().clone() for p in model.parameters()]
    state = {"m": before.m, "s": before.s, "t": before.t}
    want, *_ = _reference_inner(center, tasks[2], state)
    got = ln.adapt(tasks[2])
    torch.testing.assert_close(got["weight"], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["bias"], want[1], rtol=1e-12, atol=1e-12)
    assert ln.inner_moments.t == before.t
    assert all(torch.equal(a, b) for a, b in zip(ln.inner_moments.s, before.s, strict=True))
    # and the fresh-moment solver differs (the carried second moments change the step sizes)
    fresh = metaprox.MetaMinibatchProx(linear_model(), "mse", lam=LAM,
                                       inner=metaprox.Adam(lr=LR, steps=STEPS, beta1=0.9))
    fresh.load_state_dict({k: v for k, v in ln.state_dict().items() if k != "inner_moments"})
    assert not torch.allclose(fresh.adapt(tasks[2])["weight"], got["weight"])


def test_state_dict_round_trip_and_bitwise_resume(tmp_path):
    cfg = resolve({"outer": {"steps": 30, "meta_batch": 3}, "task": {"train_points": 10},
                   "inner": {"solver": "adam", "lr": 0.01, "beta1": 0.0, "steps": 3, "batch_size": 5,
                             "carry_moments": True},
                   "log": {"every": 5, "checkpoint_every": 10, "tensorboard": "false", "progress": False},
                   "eval": {"tasks": 4, "steps": [0, 1], "shots": [5]}})
    train(cfg, tmp_path / "full", evaluate=False)
    train(cfg, tmp_path / "split", evaluate=False, stop_at=20)
    mid, _ = load_checkpoint(tmp_path / "split")
    assert mid["inner_moments"]["t"] == 20 * 3
    train(cfg, tmp_path / "split", resume=True, evaluate=False)
    a, b = load_checkpoint(tmp_path / "full")[0], load_checkpoint(tmp_path / "split")[0]
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    for which in ("m", "s"):
        assert all(torch.equal(a["inner_moments"][which][k], b["inner_moments"][which][k]) for k in a["params"])
    assert a["inner_moments"]["t"] == b["inner_moments"]["t"] == 30 * 3


def test_carrying_is_refused_where_it_would_be_silently_ignored():
    with pytest.raises(ConfigError, match="carry_moments"):
        build_inner(resolve({"inner": {"solver": "sgd", "carry_moments": True}}))
    with pytest.raises(ValueError, match="carry"):
        FiniteMMP(linear_model(), metaprox.TaskSet(linear_tasks()), "mse",
                  inner=metaprox.Adam(carry_moments=True))
