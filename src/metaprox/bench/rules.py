"""Tasks per second of meta-gradient rules side by side: same tasks, same engine, interleaved rounds.

``time_rules`` times one outer step of every learner per round, rounds interleaved (the rule order rotates)
so that machine noise hits every rule alike; ``throughput_rows`` turns that into medians, tasks/s and the
ratio to a reference rule. Diagnostics (``monitor``) are off: the numbers time the algorithms, not the
monitors. ``metaprox bench rules`` runs the standard sine setting below (``make_rule``); ``metaprox compare``
runs the same timing on the learners of its own config.

The standard setting (Finn et al. 2017): amplitude ~ U[0.1, 5], phase ~ U[0, π], x ~ U[−5, 5], K support and
K query points per task, MLP 1-40-40-1 tanh, inner SGD with lr 0.02.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import metaprox

__all__ = ["RULES", "sine_batch", "make_rule", "time_rules", "throughput_rows", "throughput_markdown",
           "bench_rules"]

RULES = ("mmp", "maml", "maml_fo", "fomaml", "reptile", "imaml")


def sine_batch(num_tasks: int, k: int = 10, seed: int = 0) -> list[metaprox.Task]:
    """``num_tasks`` sine tasks with ``k`` support and ``k`` query points (the benchmarks' fixed batch)."""
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
    common: dict[str, Any] = {"inner": sgd, "execution": execution, "outer_lr": 1e-3}
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


def time_rules(learners: Mapping[str, metaprox.MetaLearner], tasks: Sequence[metaprox.Task],
               rounds: int = 7) -> dict[str, list[float]]:
    """Seconds of one outer step per learner and round (one warm-up step each first, not timed)."""
    names = list(learners)
    for n in names:
        learners[n].step(tasks, monitor=False)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            learners[n].step(tasks, monitor=False)
            times[n].append(time.perf_counter() - t0)
    return times


def throughput_rows(times: Mapping[str, list[float]], learners: Mapping[str, metaprox.MetaLearner],
                    num_tasks: int, reference: str | None = "mmp") -> list[dict[str, Any]]:
    """Median ms per meta-iteration, tasks/s and time relative to ``reference`` (if timed) per rule."""
    ref = statistics.median(times[reference]) if reference is not None and reference in times else None
    rows = []
    for n, ts in times.items():
        med = statistics.median(ts)
        path = learners[n].execution.resolve(torch.zeros(1, 1, 1))
        rows.append({"rule": n, "path": path, "ms_per_iteration": 1e3 * med, "tasks_per_s": num_tasks / med,
                     "vs_reference": med / ref if ref else None, "rounds": len(ts)})
    return rows


def throughput_markdown(rows: Sequence[dict[str, Any]], reference: str = "mmp") -> str:
    lines = [f"| rule | path | ms / meta-iteration | tasks/s | time vs {reference} |", "|---|---|---:|---:|---:|"]
    for r in rows:
        rel = "–" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}×"
        lines.append(f"| {r['rule']} | {r['path']} | {r['ms_per_iteration']:.1f} | {r['tasks_per_s']:.0f} | "
                     f"{rel} |")
    return "\n".join(lines)


def bench_rules(quick: bool = False, tasks: int = 100, k: int = 10, steps: int = 15,
                rules: Sequence[str] = RULES) -> dict[str, Any]:
    """``metaprox bench rules``: every rule at B = ``tasks`` sine tasks, ``steps`` inner steps, one process."""
    batch = sine_batch(tasks, k)
    learners = {r: make_rule(r, steps=steps) for r in rules}
    rounds = 2 if quick else 7
    rows = throughput_rows(time_rules(learners, batch, rounds), learners, tasks)
    head = (f"B = {tasks} tasks, K = {k}+{k}, M = {steps} inner SGD steps, MLP 1-40-40-1 tanh, torch "
            f"{torch.__version__}, {torch.get_num_threads()} thread(s), median of {rounds} rounds")
    return {"rows": rows, "markdown": head + "\n\n" + throughput_markdown(rows)}
