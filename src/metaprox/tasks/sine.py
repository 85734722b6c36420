"""Sine-wave regression (Finn et al. 2017; Zhou et al. 2019, Sec. 5.1): y = a·sin(x + b), b ~ U[0, 2π] by default.

a ~ U[amp_min, amp_max], b ~ U[phase_min, phase_max], x ~ U[x_min, x_max]. Training tasks carry ``num_points``
noisy-free samples; test tasks carry K support points and a query set of evenly spaced points on which the MSE
is measured (200 points in [−5, 5] in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metaprox.tasks.share import share_bounds
from metaprox.tasks.task import Task

__all__ = ["SineFamily"]


@dataclass(frozen=True)
class SineFamily:
    """The sine task family. All sampling goes through an explicit ``torch.Generator``."""

    amp_min: float = 0.1
    amp_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = 2 * math.pi
    x_min: float = -5.0
    x_max: float = 5.0

    def __post_init__(self) -> None:
        if not (0 <= self.amp_min <= self.amp_max and self.phase_min <= self.phase_max and self.x_min < self.x_max):
            raise ValueError(f"invalid sine family ranges: {self}.")

    def sample_params(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        amp = self.amp_min + (self.amp_max - self.amp_min) * u[:, 0]
        phase = self.phase_min + (self.phase_max - self.phase_min) * u[:, 1]
        return amp, phase

    def _x(self, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
        return self.x_min + (self.x_max - self.x_min) * torch.rand(n, k, 1, generator=generator, dtype=torch.float64)

    def sample(self, num_tasks: int, num_points: int, generator: torch.Generator,
               num_query: int = 0, part: slice | None = None) -> list[Task]:
        """``num_tasks`` training tasks with ``num_points`` random support points (and optional random query).

        ``part`` (a ``slice(lo, hi)``) builds only tasks ``lo..hi−1``: the random numbers of all ``num_tasks``
        are still drawn, so the generator ends in the same state and each built task is bitwise the one the
        full draw gives.
        """
        lo, hi = share_bounds(part, num_tasks)
        amp, phase = (v[lo:hi] for v in self.sample_params(num_tasks, generator))
        x = self._x(num_tasks, num_points, generator)[lo:hi]
        xq = self._x(num_tasks, num_query, generator)[lo:hi] if num_query else None
        y = amp.view(-1, 1, 1) * torch.sin(x + phase.view(-1, 1, 1))
        yq = None if xq is None else amp.view(-1, 1, 1) * torch.sin(xq + phase.view(-1, 1, 1))
        x, y = x.float(), y.float()
        return [Task(x[i], y[i], None if xq is None else xq[i].float(), None if yq is None else yq[i].float())
                for i in range(hi - lo)]

    def test_tasks(self, num_tasks: int, shots: int, generator: torch.Generator,
                   num_eval_points: int = 200) -> list[Task]:
        """Test tasks: ``shots`` random support points, query = evenly spaced points over [x_min, x_max]."""
        amp, phase = self.sample_params(num_tasks, generator)
        x = self._x(num_tasks, shots, generator)
        y = amp.view(-1, 1, 1) * torch.sin(x + phase.view(-1, 1, 1))
        grid = torch.linspace(self.x_min, self.x_max, num_eval_points, dtype=torch.float64).view(1, -1, 1)
        yg = amp.view(-1, 1, 1) * torch.sin(grid + phase.view(-1, 1, 1))
        return [Task(x[i].float(), y[i].float(), grid[0].float(), yg[i].float(), name=f"sine-test-{i}")
                for i in range(num_tasks)]
