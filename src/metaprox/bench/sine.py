"""``metaprox bench sine``: MMP outer iterations on sine tasks — tasks/s per execution strategy, peak memory
against the number of inner steps, and the projected time of the paper's full schedule.

Throughput: MLP 1-40-40-1 tanh, K = 10 points per task, 15 inner SGD steps, B ∈ {10, 100} tasks per outer
iteration; all strategies are timed in one process, interleaved, median of repeats.
Memory: one outer iteration in a fresh subprocess per point (B = 1000 tasks × K = 100 points, so tensors
dominate); peak RSS growth over the process's RSS just before the iteration (Linux ``clear_refs`` resets the
high-water mark). glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors are
returned to the OS instead of being cached by the allocator: RSS then tracks live tensors.
A first-order method that keeps no graph across steps stays flat in the number of steps.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

__all__ = ["bench_sine", "sine_learner", "sine_tasks"]

STRATEGIES = ("fused", "batched", "vmap", "loop")


def sine_learner(strategy: str, steps: int = 15, batch_size: int | None = None, outer_lr: float = 0.8):
    import metaprox

    torch.manual_seed(0)
    return metaprox.MetaMinibatchProx(metaprox.MLP([1, 40, 40, 1]), "mse", lam=0.5,
                                      inner=metaprox.SGD(lr=0.02, steps=steps, batch_size=batch_size),
                                      outer_lr=outer_lr, total_steps=10**9, execution=strategy)


def sine_tasks(b: int, k: int, seed: int = 0):
    from metaprox.tasks.sine import SineFamily

    return SineFamily().sample(b, k, torch.Generator().manual_seed(seed))


def _throughput(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for b in (10, 100):
        tasks = sine_tasks(b, 10)
        learners = {s: sine_learner(s) for s in STRATEGIES}
        times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for lr in learners.values():  # warm-up
            lr.step(tasks, monitor=False)
        repeats = 3 if quick else 7
        for _ in range(repeats):
            for s, lr in learners.items():
                n = 1 if (s == "loop" and b == 100) or quick else 5
                t0 = time.perf_counter()
                for _ in range(n):
                    lr.step(tasks, monitor=False)
                times[s].append((time.perf_counter() - t0) / n)
        for s in STRATEGIES:
            med = statistics.median(times[s])
            rows.append({"B": b, "strategy": s, "ms_per_iteration": 1e3 * med, "tasks_per_s": b / med})
    return rows


def _schedule(quick: bool) -> dict[str, Any]:
    """ms per outer iteration of configs/sine.toml (meta-batch 5, 50 points, 15 inner steps on minibatches of 2,
    monitors every 250 iterations) → projected time of its S = 30,000 schedule."""
    from metaprox.tasks.sine import SineFamily

    fam, g = SineFamily(), torch.Generator().manual_seed(1)
    lr = sine_learner("auto", batch_size=2, outer_lr=3.2)
    for _ in range(20):
        lr.step(fam.sample(5, 50, g), monitor=False)
    n = 200 if quick else 1000
    t0 = time.perf_counter()
    for i in range(n):
        lr.step(fam.sample(5, 50, g), monitor=(i % 250 == 0))
    per = (time.perf_counter() - t0) / n
    return {"ms_per_iteration": 1e3 * per, "projected_minutes_30000": per * 30000 / 60}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(steps: int, strategy: str) -> dict[str, Any]:
    """Run in a fresh process: peak RSS growth (MiB) of one outer iteration with ``steps`` inner steps."""
    torch.set_num_threads(1)
    lr = sine_learner(strategy, steps)
    tasks = sine_tasks(1000, 100)
    lr.step(sine_tasks(2, 100), monitor=False)  # import/initialise lazily-loaded kernels first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kb("VmRSS")
    lr.step(tasks, monitor=True)
    peak = _rss_kb("VmHWM")
    return {"steps": steps, "strategy": strategy, "peak_growth_mib": (peak - base) / 1024}


def _memory(strategy: str) -> list[dict[str, Any]]:
    rows = []
    for steps in (1, 15, 100):
        code = ("import json,sys; from metaprox.bench.sine import memory_probe; "
                f"print(json.dumps(memory_probe({steps}, {strategy!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def bench_sine(quick: bool = False) -> dict[str, Any]:
    thr = _throughput(quick)
    mem = {s: _memory(s) for s in (("fused",) if quick else ("fused", "batched", "vmap"))}
    sched = _schedule(quick)
    md = ["### Throughput (MMP outer iterations, K = 10, 15 inner SGD steps)", "",
          "| B | strategy | ms / iteration | tasks / s |", "|---|---|---|---|"]
    md += [f"| {r['B']} | {r['strategy']} | {r['ms_per_iteration']:.1f} | {r['tasks_per_s']:.0f} |" for r in thr]
    md += ["", "### Peak memory growth of one outer iteration (B = 1000, K = 100), fresh process per point", "",
           "| strategy | 1 step (MiB) | 15 steps (MiB) | 100 steps (MiB) | ratio 100 / 1 |", "|---|---|---|---|---|"]
    for s, rows in mem.items():
        v = [r["peak_growth_mib"] for r in rows]
        md.append(f"| {s} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[2] / max(v[0], 1e-9):.2f} |")
    md += ["", "### Full sine schedule of configs/sine.toml (meta-batch 5, 50 points, 15 steps, minibatch 2)", "",
           f"{sched['ms_per_iteration']:.2f} ms / iteration → {sched['projected_minutes_30000']:.1f} min for "
           f"S = 30,000 (torch threads: {torch.get_num_threads()})"]
    return {"throughput": thr, "memory": mem, "schedule": sched, "markdown": "\n".join(md)}
