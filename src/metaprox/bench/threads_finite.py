"""Intra-op threads side by side: the same finite-set training steps with 1 thread and with every core (the
process-level choice of :func:`metaprox.threads.apply_threads`; the per-solve adjustment is off while it runs).

The workload is the everyday finite set of the CLI (:mod:`metaprox.threads` picks one thread for it): 140 tasks
of 20–250 rows, 27 features, one target; a linear model and a small MLP (27-32-1), per-task SGD solves (15
steps), gradient center steps on minibatches of 16 tasks. Rounds alternate the thread counts so that machine
noise hits both alike; medians over rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

__all__ = ["bench_finite_threads", "finite_workload"]


def finite_workload(model: str, tasks: int = 140, seed: int = 0) -> Any:
    """A FiniteMMP on ``tasks`` generated tasks (see the module doc)."""
    from metaprox import SGD
    from metaprox.algorithms.finite import FiniteMMP
    from metaprox.tasks.task import Task
    from metaprox.tasks.taskset import TaskSampler, TaskSet

    rng = np.random.default_rng(seed)
    shared = rng.normal(size=27)
    data = []
    for _ in range(tasks):
        n = int(np.round(np.exp(rng.uniform(np.log(20), np.log(250)))))
        x = rng.normal(size=(n, 27))
        y = x @ (shared + 0.3 * rng.normal(size=27)) + rng.normal(size=n)
        data.append(Task(torch.from_numpy(x), torch.from_numpy(y).view(-1, 1)))
    torch.manual_seed(seed)
    net = torch.nn.Linear(27, 1) if model == "linear" else torch.nn.Sequential(
        torch.nn.Linear(27, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return FiniteMMP(net.double(), TaskSet(data), lam=1.0, inner=SGD(lr=0.05, steps=15),
                     sampler=TaskSampler(tasks, min(16, tasks), seed=seed), outer_lr=0.5)


def bench_finite_threads(quick: bool = False, tasks: int = 140, rounds: int | None = None,
                  counts: list[int] | None = None) -> dict[str, Any]:
    """Median ms per outer step for each thread count (default: 1 and every core), and the ratio to 1 thread."""
    from metaprox import threads
    from metaprox.threads import usable_cores

    many = usable_cores()
    counts = counts or ([1] if many == 1 else [1, many])
    if counts[0] != 1:
        raise ValueError(f"bench threads: the first count is the 1-thread reference, got {counts}.")
    steps, default_rounds = (3, 2) if quick else (10, 5)
    rounds = rounds or default_rounds
    before = torch.get_num_threads()
    rows = []
    threads.set_auto(False)  # n threads really means n: no per-solve reduction
    try:
        for model in ("linear", "mlp"):
            times: dict[int, list[float]] = {n: [] for n in counts}
            for r in range(rounds):
                for n in counts if r % 2 == 0 else counts[::-1]:
                    torch.set_num_threads(n)
                    learner = finite_workload(model, tasks)
                    learner.step(monitor=False)  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        learner.step(monitor=False)
                    times[n].append((time.perf_counter() - t0) / steps)
            base = statistics.median(times[1])
            for n in counts:
                med = statistics.median(times[n])
                rows.append({"model": model, "threads": n, "ms_per_step": 1e3 * med, "vs_one_thread": med / base})
    finally:
        torch.set_num_threads(before)
        threads.set_auto(True)
    md = [f"### Intra-op threads (finite set: {tasks} tasks of 20–250 rows, 27 features, batches of 16, 15 SGD "
          "inner steps)", "", "| model | threads | ms / outer step | time vs 1 thread |", "|---|---|---|---|"]
    md += [f"| {r['model']} | {r['threads']} | {r['ms_per_step']:.1f} | {r['vs_one_thread']:.2f}× |" for r in rows]
    md += ["", f"Cores available to this process: {many}. `metaprox train` picks 1 thread for these models "
           f"(metaprox.threads)."]
    return {"rows": rows, "markdown": "\n".join(md) + "\n"}
