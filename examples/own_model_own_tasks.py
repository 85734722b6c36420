"""Meta-train *your* model on *your* task family with the Python API — copy, run, adapt.

The task family here: noisy quadratics y = a·x² + b·x + c with task-specific (a, b, c) scattered around a
common center; the model: a small residual network written as a plain nn.Module (it runs on the generic
``vmap`` execution path; Linear/activation stacks get the faster fused path automatically).

    python examples/own_model_own_tasks.py            # about half a minute on a 2-core CPU
"""

from __future__ import annotations

import torch
from torch import nn

import metaprox


class ResidualNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(1, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.hidden(h))
        return self.out(h)


def quadratic_tasks(n: int, points: int, g: torch.Generator, query: int = 0) -> list[metaprox.Task]:
    coef = torch.tensor([1.0, -0.5, 0.3]) + 0.4 * torch.randn(n, 3, generator=g)
    tasks = []
    for a, b, c in coef:
        x = torch.rand(points + query, 1, generator=g) * 4 - 2
        y = a * x**2 + b * x + c + 0.05 * torch.randn(points + query, 1, generator=g)
        if query:
            tasks.append(metaprox.Task(x[:points], y[:points], x[points:], y[points:]))
        else:
            tasks.append(metaprox.Task(x, y))
    return tasks


def main(steps: int = 500, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ResidualNet()
    mmp = metaprox.MetaMinibatchProx(
        model, loss="mse", lam=1.0,
        inner=metaprox.SGD(lr=0.05, steps=10),
        meta_optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),  # any torch.optim optimizer works
        total_steps=steps,                                             # linear decay of its lr
    )
    for s in range(steps):
        diag = mmp.step(quadratic_tasks(5, 20, g), monitor=(s % 100 == 0))
        if s % 100 == 0:
            print(f"step {s:5d}  φ={diag['phi']:.4f}  ‖meta-grad‖={diag['meta_grad_norm']:.4f}  "
                  f"inner ε={diag['inner_stationarity']:.3f}")

    # Few-shot test: adapt from the learned prior on 5 points, measure on 100 held-out points of the same task.
    test = quadratic_tasks(100, 5, torch.Generator().manual_seed(123), query=100)
    curve = metaprox.adaptation_curve(mmp, test, steps=20)
    summary = curve.summary([0, 20])
    for k, row in summary.items():
        print(f"after {k:>2} steps: test MSE {row['loss']:.4f} ± {row['loss_ci95']:.4f} ({int(row['tasks'])} tasks)")

    # The same for one task, by hand: adapt → predict.
    params = mmp.adapt(test[0], steps=20)
    pred = mmp.predict(params, test[0].x_query)
    print("task 0 query MSE:", float(((pred - test[0].y_query) ** 2).mean()))
    return {k: v["loss"] for k, v in summary.items()}


if __name__ == "__main__":
    main()
