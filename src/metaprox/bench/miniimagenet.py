"""``metaprox bench miniimagenet``: CPU cost of one Conv-4 MMP outer iteration, today's path against the fast one.

Setting: the MMP paper's miniImageNet recipe — 5 tasks, 5-way, 15 training shots (75 images of 3×84×84 per
task), Conv-4 with 32 filters and batch-statistics BatchNorm, 8 inner Adam steps (β1 = 0) — and the Omniglot
shape of ``metaprox bench omniglot`` (5 tasks, 5-way, 6 shots, 1×28×28). Random images of the right shape
(timing does not depend on pixel values).

Variants (each in its own worker process, because the allocator setting is process-wide):

- ``default``: the path before issue 11 — grouped task layout, glibc's default allocator behaviour;
- ``fast``: what ``metaprox train`` runs now — ``task_layout="auto"`` (per task for colour images) and
  :func:`metaprox.malloc.retain_freed_memory`;
- ``loop``: the plain per-task loop (``execution="loop"``, default allocator);
- without ``--quick``, the two ingredients alone: ``default+retain`` and ``per_task+system``.

The parent starts every worker, warms each up with one iteration, then asks them for iterations in turn
(round-robin, so background load hits all alike) and reports medians. Each worker measures its own
``getrusage``: user and system CPU seconds, wall seconds and minor page faults per iteration. FLOPs: the
network's forward + backward convolutions and linear layers per gradient (``torch.utils.flop_counter`` on one
task), × tasks × inner steps — the same count for every variant. The machine's fp32 GEMM rate is measured in
the same run (a 2048² ``torch.mm`` on the parent's thread count, best of 5, CPU time), and achieved FLOP/s is
reported per CPU second, so that load from other processes (which stretches wall time) does not distort it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench_miniimagenet", "SHAPES", "network_flops", "gemm_rate"]

SHAPES: dict[str, dict[str, int]] = {
    "miniimagenet": {"tasks": 5, "ways": 5, "shots": 15, "channels": 3, "size": 84, "filters": 32, "steps": 8},
    "omniglot": {"tasks": 5, "ways": 5, "shots": 6, "channels": 1, "size": 28, "filters": 32, "steps": 8},
}
# name → (execution, task_layout, allocator)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "default": ("auto", "grouped", "system"),
    "fast": ("auto", "auto", "retain"),
    "loop": ("loop", "auto", "system"),
    "default+retain": ("auto", "grouped", "retain"),
    "per_task+system": ("auto", "per_task", "system"),
}
QUICK_VARIANTS = ("default", "fast", "loop")


def _learner_and_tasks(shape: dict[str, int], execution: str, layout: str):
    import metaprox
    from metaprox.models.conv4 import Conv4

    g = torch.Generator().manual_seed(0)
    n, c, s = shape["ways"] * shape["shots"], shape["channels"], shape["size"]
    tasks = [metaprox.Task(torch.rand(n, c, s, s, generator=g), torch.arange(shape["ways"]).repeat_interleave(
        shape["shots"])) for _ in range(shape["tasks"])]
    torch.manual_seed(0)
    model = Conv4(c, shape["ways"], shape["filters"], s, bn="transductive", channels_last=True, task_layout=layout)
    learner = metaprox.MetaMinibatchProx(model, "cross_entropy", lam=0.1, outer_lr=10.0, execution=execution,
                                         inner=metaprox.Adam(lr=1e-3, steps=shape["steps"], beta1=0.0))
    return learner, tasks


def network_flops(shape: dict[str, int]) -> float:
    """FLOPs of the inner gradients of one outer iteration: forward + backward (weights; inputs except the
    first layer's) of every convolution and linear layer, for ``tasks × steps`` gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    learner, tasks = _learner_and_tasks({**shape, "tasks": 1}, "loop", "per_task")
    params = [p.detach().requires_grad_(True) for p in learner.fmodel.params()]
    with FlopCounterMode(display=False) as counter:
        loss = learner.loss.single(learner.fmodel.single(params, tasks[0].x), tasks[0].y)
        torch.autograd.grad(loss, params)
    return float(counter.get_total_flops()) * shape["tasks"] * shape["steps"]


def gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP per CPU second of a ``size``² matrix product on this process's threads (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - t0)
    return 2.0 * size**3 / best


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _worker() -> None:
    """Child process: spec on the first stdin line, then one JSON reply per ``step`` line (``iters`` iterations)."""
    spec = json.loads(sys.stdin.readline())
    torch.set_num_threads(int(spec["threads"]))
    execution, layout, allocator = VARIANTS[spec["variant"]]
    if allocator == "retain":
        from metaprox.malloc import retain_freed_memory

        if not retain_freed_memory():
            raise RuntimeError("retain_freed_memory() had no effect (not glibc?)")
    learner, tasks = _learner_and_tasks(spec["shape"], execution, layout)
    learner.step(tasks, monitor=False)  # warm-up: lazy initialisation, oneDNN primitives, heap growth
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        iters = int(json.loads(line)["iters"])
        w0, u0, s0, f0 = _usage()
        for _ in range(iters):
            learner.step(tasks, monitor=False)
        w1, u1, s1, f1 = _usage()
        print(json.dumps({"wall": (w1 - w0) / iters, "user": (u1 - u0) / iters, "sys": (s1 - s0) / iters,
                          "minflt": (f1 - f0) / iters}), flush=True)


class _Worker:
    def __init__(self, shape: dict[str, int], variant: str, threads: int):
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        env.pop("METAPROX_MALLOC", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "metaprox.bench.miniimagenet"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._send({"shape": shape, "variant": variant, "threads": threads})

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker exited with code {self.proc.wait()} (see its stderr above).")
        return json.loads(line)

    def measure(self, iters: int) -> dict[str, Any]:
        self._send({"iters": iters})
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _bench_shape(name: str, shape: dict[str, int], variants: tuple[str, ...], reps: int, iters: int,
                 threads: int, log: Any) -> list[dict[str, Any]]:
    flops = network_flops(shape)
    workers = {}
    try:
        for v in variants:  # started and warmed up one at a time, so warm-ups do not compete
            workers[v] = _Worker(shape, v, threads)
            workers[v].reply()
            log(f"{name}: worker {v} ready")
        samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(reps):
            for v, w in workers.items():
                samples[v].append(w.measure(iters))
            log(f"{name}: round {r + 1}/{reps} done")
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for v in variants:
        med = {k: statistics.median(s[k] for s in samples[v]) for k in ("wall", "user", "sys", "minflt")}
        cpu = statistics.median(s["user"] + s["sys"] for s in samples[v])
        rows.append({"shape": name, "variant": v, **med, "cpu": cpu, "sys_share": med["sys"] / cpu,
                     "flops": flops, "flop_per_cpu_s": flops / cpu})
    base = next(r["cpu"] for r in rows if r["variant"] == "default")
    for row in rows:
        row["cpu_ratio_vs_default"] = row["cpu"] / base
    return rows


def bench_miniimagenet(quick: bool = False, shapes: dict[str, dict[str, int]] | None = None,
                       reps: int | None = None, variants: tuple[str, ...] | None = None, gemm_size: int = 2048,
                       log: Any = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns rows and a Markdown table."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    shapes = SHAPES if shapes is None else shapes
    if variants is None:
        variants = QUICK_VARIANTS if quick else tuple(VARIANTS)
    if "default" not in variants or "fast" not in variants:
        raise ValueError(f"bench miniimagenet needs the 'default' and 'fast' variants; got {variants}.")
    threads = torch.get_num_threads()
    reps = reps if reps is not None else (1 if quick else 3)
    load0 = os.getloadavg()
    gemm = gemm_rate(gemm_size)
    rows = []
    for name, shape in shapes.items():
        iters = 1 if shape["size"] * shape["channels"] >= 84 else 5  # short iterations: several per sample
        rows += _bench_shape(name, shape, variants, reps, iters, threads, log)
    gemm = max(gemm, gemm_rate(gemm_size))  # the better of two measurements, before and after
    load1 = os.getloadavg()
    for r in rows:
        r["gemm_share"] = r["flop_per_cpu_s"] / gemm
    shapes_md = "; ".join(f"{n}: {s['tasks']} tasks × {s['ways']}-way × {s['shots']} shots of "
                          f"{s['channels']}×{s['size']}×{s['size']}, {s['filters']} filters, {s['steps']} inner "
                          f"Adam steps" for n, s in shapes.items())
    md = [f"Conv-4 MMP outer iteration ({shapes_md}). Medians of {reps} interleaved samples; torch threads "
          f"{threads}; fp32 GEMM rate {gemm / 1e9:.1f} GFLOP per CPU-second ({gemm_size}² mm, same run); load average "
          f"{load0[0]:.1f} at start, {load1[0]:.1f} at end (2 cores shared).", "",
          "| shape | variant | CPU s / iter | user | sys | sys share | wall s / iter | minor faults / iter "
          "| CPU vs default | GFLOP / CPU-s | of GEMM rate |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['variant']} | {r['cpu']:.2f} | {r['user']:.2f} | {r['sys']:.2f} | "
                  f"{100 * r['sys_share']:.0f} % | {r['wall']:.2f} | {r['minflt']:.0f} | "
                  f"{r['cpu_ratio_vs_default']:.2f}× | {r['flop_per_cpu_s'] / 1e9:.1f} | "
                  f"{100 * r['gemm_share']:.0f} % |")
    md.append("")
    for name in shapes:
        by = {r["variant"]: r for r in rows if r["shape"] == name}
        f = by["fast"]
        loop = f" (loop: {1 / by['loop']['cpu_ratio_vs_default']:.2f}×)" if "loop" in by else ""
        md.append(f"- {name}: fast uses {1 / f['cpu_ratio_vs_default']:.2f}× less CPU time than default{loop}; "
                  f"system time {100 * f['sys_share']:.0f} % "
                  f"of its CPU time (default {100 * by['default']['sys_share']:.0f} %); "
                  f"{100 * f['gemm_share']:.0f} % of the GEMM rate.")
    return {"rows": rows, "gemm_flop_per_cpu_s": gemm, "threads": threads, "load": [load0, load1],
            "markdown": "\n".join(md)}


if __name__ == "__main__":
    _worker()
