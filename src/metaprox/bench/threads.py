"""``metaprox bench threads``: (1) the process's thread count on the finite-set workload
(:mod:`metaprox.bench.threads_finite`), and (2) the sine ``fused`` path at B = 100 with a fixed thread count
against the per-solve work-size choice of :mod:`metaprox.threads`, with and without background load that the
benchmark starts itself.

Setting: MMP on sine tasks (MLP 1-40-40-1, K = 10, 15 inner SGD steps, B = 100; the throughput setting of
``metaprox bench sine``). ``fixed``: every op on ``torch.get_num_threads()`` threads (the machine's cores unless
``OMP_NUM_THREADS`` says otherwise); ``auto``: :func:`metaprox.threads.choose_threads` (one thread for this
~10 MFLOP gradient). Load: ``cores`` busy single-threaded Python processes (``while True: pass``) started by the
benchmark and stopped before it returns. The two variants alternate (median of repeats).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

__all__ = ["bench_threads"]


def _rate(learner: Any, tasks: list, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        learner.step(tasks, monitor=False)
        n += 1
    return n * len(tasks) / (time.perf_counter() - t0)


def _measure(quick: bool) -> dict[str, float]:
    from metaprox import threads
    from metaprox.bench.sine import sine_learner, sine_tasks

    tasks, learner = sine_tasks(100, 10), sine_learner("fused")
    learner.step(tasks, monitor=False)
    rates: dict[str, list[float]] = {"fixed": [], "auto": []}
    try:
        for _ in range(2 if quick else 5):
            for name in rates:
                threads.set_auto(name == "auto")
                rates[name].append(_rate(learner, tasks, 0.5 if quick else 2.0))
    finally:
        threads.set_auto(True)
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_threads(quick: bool = False, load_processes: int | None = None) -> dict[str, Any]:
    """Both measurements; ``rows`` are the per-solve choice's (sine), ``finite`` the process-level ones."""
    from metaprox.bench.threads_finite import bench_finite_threads
    from metaprox.threads import choose_threads, gradient_flops

    finite = bench_finite_threads(quick=quick)

    cores = os.cpu_count() or 1
    n_load = cores if load_processes is None else load_processes
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = [{"load": "none added", **_measure(quick), "loadavg": os.getloadavg()[0]}]
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_load)]
    try:
        time.sleep(1.0)
        rows.append({"load": f"{n_load} busy processes", **_measure(quick), "loadavg": os.getloadavg()[0]})
    finally:
        for p in procs:
            p.kill()
            p.wait()
    from metaprox.bench.sine import sine_learner, sine_tasks

    learner, x = sine_learner("fused"), sine_tasks(100, 10)
    xs, ys = learner.execution.stack(x)
    work = gradient_flops(learner.fmodel, learner.loss, xs, ys)
    md = [f"Sine MMP, fused, B = 100, K = 10, 15 inner SGD steps: tasks/s (median of interleaved repeats). "
          f"{cores} cores; fixed = {threads} threads, auto = choose_threads({work / 1e6:.1f} MFLOP per gradient) "
          f"= {choose_threads(work, threads)} thread(s).", "",
          "| background load | load average | fixed tasks/s | auto tasks/s | auto / fixed |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {r['load']} | {r['loadavg']:.1f} | {r['fixed']:.0f} | {r['auto']:.0f} | {r['auto'] / r['fixed']:.2f}× |"
           for r in rows]
    md = [finite["markdown"], "### Per-solve threads under load", "", *md]
    return {"rows": rows, "finite": finite["rows"], "threads": threads, "gradient_flops": work,
            "markdown": "\n".join(md)}
