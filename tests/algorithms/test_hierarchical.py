"""HierarchicalMMP (infinite setting): adaptation from group / root against closed forms, and training
moves group centers toward their tasks and the root toward the groups."""

from __future__ import annotations

import torch

import metaprox
from metaprox.algorithms.hierarchical import HierarchicalMMP

DT = torch.float64


def task(seed, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 2, generator=g, dtype=DT)
    return metaprox.Task(x, x @ torch.tensor([[1.0], [-1.0]], dtype=DT) + shift)


def quad(t):
    xa = torch.cat([t.x, torch.ones(t.num_examples, 1, dtype=DT)], 1)
    return 2.0 / t.num_examples * xa.T @ xa, 2.0 / t.num_examples * (xa.T @ t.y).flatten()


def learner(lam=2.0, lam_group=0.5):
    torch.manual_seed(0)
    return HierarchicalMMP(torch.nn.Linear(2, 1).to(DT), "mse", lam=lam, lam_group=lam_group,
                           inner=metaprox.ExactLeastSquares(), outer_lr=0.3)


def flat(p):
    return torch.cat([p["weight"].flatten(), p["bias"].flatten()])


def test_unknown_group_adapts_with_marginal_pull():
    hm = learner()
    t = task(1, 3.0)
    a, b = quad(t)
    w = torch.cat([hm.model.weight.detach().flatten(), hm.model.bias.detach()])
    # joint minimisation over v and an unknown group center θ_g: λ/2‖v − θ‖² + λ_g/2‖θ − w‖² ⇒ pull λλ_g/(λ+λ_g)
    lam_eff = 2.0 * 0.5 / 2.5
    want = torch.linalg.solve(a + lam_eff * torch.eye(3, dtype=DT), b + lam_eff * w)
    assert torch.allclose(flat(hm.adapt(t, where="never-seen")), want, atol=1e-10)


def test_known_group_adapts_from_group_center_and_training_moves_centers():
    hm = learner()
    tasks = [task(i, 3.0) for i in range(4)] + [task(10 + i, -3.0) for i in range(4)]
    groups = ["up"] * 4 + ["down"] * 4
    for _ in range(60):
        hm.step(tasks, where=groups, monitor=False)
    up, down = hm.groups["up"][1], hm.groups["down"][1]
    assert float(up) > 1.0 and float(down) < -1.0  # group biases follow their tasks
    assert abs(float(hm.model.bias.detach())) < 0.5 * float(up)  # the root sits between the groups
    t = task(99, 3.0)
    a, b = quad(t)
    c = torch.cat([hm.groups["up"][0].flatten(), hm.groups["up"][1]])
    want = torch.linalg.solve(a + 2.0 * torch.eye(3, dtype=DT), b + 2.0 * c)
    assert torch.allclose(flat(hm.adapt(t, where="up")), want, atol=1e-10)


def test_node_centers_survive_a_checkpoint(tmp_path):
    """Save after 3 of 6 steps, load into a fresh learner, 3 more steps = 6 uninterrupted steps (bitwise)."""
    from metaprox.checkpoint import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        return HierarchicalMMP(torch.nn.Linear(2, 1).to(DT), "mse", lam=2.0, lam_levels=[0.5, 1.0],
                               inner=metaprox.SGD(lr=0.1, steps=3), outer_lr=0.3)

    batches = [([task(10 * s + i, float(i)) for i in range(3)], [("a", "x"), ("b", "y"), ("a", "z")])
               for s in range(6)]
    full, first = make(), make()
    for ts, gs in batches:
        full.step(ts, where=gs, monitor=False)
    for ts, gs in batches[:3]:
        first.step(ts, where=gs, monitor=False)
    save_checkpoint(tmp_path, first.state_dict(), {})
    resumed = make()
    resumed.load_state_dict(load_checkpoint(tmp_path)[0])
    assert list(resumed.nodes) == list(first.nodes) == [("a",), ("a", "x"), ("b",), ("b", "y"), ("a", "z")]
    for ts, gs in batches[3:]:
        resumed.step(ts, where=gs, monitor=False)
    assert list(resumed.nodes) == list(full.nodes)
    for path in full.nodes:
        assert all(torch.equal(a, b) for a, b in zip(resumed.nodes[path], full.nodes[path], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.center(), full.center(), strict=True))
