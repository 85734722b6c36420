"""The benchmarks' shared setting: sine regression (Finn et al. 2017), MLP 1-40-40-1 tanh, K support + K
query.

Amplitude ~ U[0.1, 5], phase ~ U[0, π], x ~ U[−5, 5]; one task = K support and K query points.
"""

from __future__ import annotations

import math

import torch

import metaprox

__all__ = ["sine_batch", "make_rule", "RULES"]

RULES = ("mmp", "maml", "maml_fo", "fomaml", "reptile", "imaml")


def sine_batch(num_tasks: int, k: int = 10, seed: int = 0) -> list[metaprox.Task]:
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=g)
    phase = math.pi * torch.rand(num_tasks, 1, 1, generator=g)
    x = torch.rand(num_tasks, 2 * k, 1, generator=g) * 10 - 5
    y = amp * torch.sin(x + phase)
    return [metaprox.Task(x[b, :k], y[b, :k], x[b, k:], y[b, k:]) for b in range(num_tasks)]


def make_rule(name: str, steps: int = 15, lr: float = 0.02, execution: str = "auto",
              seed: int = 0) -> metaprox.MetaLearner:
    """One learner per rule on the same model init, inner SGD(lr, steps) and execution strategy."""
    torch.manual_seed(seed)
    model = metaprox.MLP([1, 40, 40, 1])
    sgd = metaprox.SGD(lr=lr, steps=steps)
    common = {"inner": sgd, "execution": execution, "outer_lr": 1e-3}
    if name == "mmp":
        return metaprox.MetaMinibatchProx(model, "mse", lam=0.5, **common)
    if name == "maml":
        return metaprox.MAML(model, "mse", **common)
    if name == "maml_fo":
        return metaprox.MAML(model, "mse", first_order=True, **common)
    if name == "fomaml":
        return metaprox.FOMAML(model, "mse", **common)
    if name == "reptile":
        return metaprox.Reptile(model, "mse", **common)
    if name == "imaml":
        return metaprox.IMAML(model, "mse", lam=0.5, cg_steps=5, **common)
    raise ValueError(f"unknown rule {name!r}; choose from {RULES}.")
