"""Peak memory of one meta-iteration against the number of inner steps M, one fresh process per point.

A point is a *spec*: ``{"config": <resolved run config>}`` (the learner and tasks are built from it, as
``metaprox compare`` does), ``{"rule": <name in metaprox.bench.rules.RULES>, "k": K}`` (the standard sine
setting) or ``{"fewshot": {...}, "rule": NAME}`` (random image episodes, :mod:`metaprox.bench.fewshot_memory`),
plus ``"steps"`` (M) and ``"tasks"`` (B). The child process builds the learner and B tasks, warms
the code paths up on a 2-task batch with M = 1, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), takes the current RSS as baseline and runs one meta-iteration (monitors off); the
point is ``VmHWM − baseline``, the peak resident-set increase. glibc's mmap threshold is fixed
(``MALLOC_MMAP_THRESHOLD_``) so that large tensors are fresh mappings that RSS counts rather than recycled
heap. Rules that keep no graph across inner steps stay flat in M; second-order MAML grows linearly.
Linux only (needs /proc).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["peak_memory", "memory_vs_steps", "plot_memory", "memory_markdown"]

ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _learner_and_tasks(spec: Mapping[str, Any], steps: int, tasks: int, seed: int = 0):
    import torch

    if "config" in spec:
        from metaprox.build import build_family, build_learner

        cfg = json.loads(json.dumps(spec["config"]))
        cfg["inner"]["steps"] = steps
        fam = build_family(cfg)
        return build_learner(cfg), fam.train_batch(tasks, torch.Generator().manual_seed(seed))
    if "fewshot" in spec:
        from metaprox.bench.fewshot_memory import fewshot_learner_and_tasks

        return fewshot_learner_and_tasks(spec["fewshot"], spec["rule"], steps, tasks, seed)
    from metaprox.bench.rules import make_rule, sine_batch

    return make_rule(spec["rule"], steps=steps), sine_batch(tasks, int(spec.get("k", 10)), seed=seed)


def _child(spec: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    learner, batch = _learner_and_tasks(spec, int(spec["steps"]), int(spec["tasks"]))
    warm, warm_batch = _learner_and_tasks(spec, 1, 2, seed=1)
    warm.step(warm_batch, monitor=False)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    learner.step(batch, monitor=False)
    peak = _status_kib("VmHWM")
    return {"steps": int(spec["steps"]), "tasks": int(spec["tasks"]), "peak_increase_mib": (peak - base) / 1024,
            "baseline_mib": base / 1024}


def peak_memory(spec: Mapping[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run one point (see the module docstring) in a fresh Python process; returns its measurement."""
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("memory measurement needs Linux /proc/self/clear_refs (peak RSS reset).")
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "metaprox.bench.memory"], input=json.dumps(spec), text=True,
                          capture_output=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {dict(spec, config='…')} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_vs_steps(specs: Mapping[str, Mapping[str, Any]], steps: Sequence[int], tasks: int,
                    log: Any = None, timeout: float = 600.0) -> list[dict[str, Any]]:
    """One fresh-process point per (label, M); ``specs`` maps a label to a spec without steps/tasks."""
    points = []
    for label, spec in specs.items():
        for m in steps:
            p = {"label": label, **peak_memory({**spec, "steps": int(m), "tasks": int(tasks)}, timeout=timeout)}
            points.append(p)
            if log is not None:
                log(f"memory {label:10s} M={m:4d}  peak +{p['peak_increase_mib']:8.1f} MiB")
    return points


def memory_markdown(points: Sequence[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(p["label"] for p in points))
    steps = sorted({p["steps"] for p in points})
    lines = ["| rule | " + " | ".join(f"M = {m} (MiB)" for m in steps) + f" | M = {steps[-1]} / M = {steps[0]} |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for label in labels:
        by = {p["steps"]: p["peak_increase_mib"] for p in points if p["label"] == label}
        ratio = by[steps[-1]] / max(by[steps[0]], 1e-9)
        lines.append(f"| {label} | " + " | ".join(f"{by[m]:.1f}" for m in steps) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def plot_memory(points: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(p["label"] for p in points):
        pts = sorted((p for p in points if p["label"] == label), key=lambda p: p["steps"])
        ax.plot([p["steps"] for p in pts], [p["peak_increase_mib"] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("inner steps M")
    ax.set_ylabel("peak RSS increase of one meta-iteration (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # the child process of peak_memory: spec on stdin, one JSON line on stdout
    print(json.dumps(_child(json.loads(sys.stdin.read()))))
