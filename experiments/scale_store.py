"""Scale: FiniteMMP over 10⁶ tasks whose private linear heads live in a memory-mapped store.

Task i is a linear regression with ``--examples`` rows and ``--features`` inputs whose data are a pure function
of i (a counter-based hash → normals), so no task data is ever resident: θ_i = θ₀ + 0.5·z_i, y = xθ_i + 0.1ε.
Each outer step solves a batch of tasks exactly (ridge toward the center, ExactLeastSquares, warm start from
the store), writes their heads to the memmap store, and moves the center with the paper's envelope gradient;
the store is committed (flush + checksums + atomic index) every ``--commit-every`` steps. Reported: tasks/s
(all of it: data generation, store read/write, solve, center step, commits), peak RSS of the process, store
size on disk, time to reopen with checksum verification, and the center's distance to θ₀.

    python experiments/scale_store.py --tasks 1000000 --epochs 2 --dir /tmp/metaprox-scale
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import metaprox
from metaprox.algorithms.finite import FiniteMMP
from metaprox.store import MemmapStore, ParamLayout
from metaprox.tasks.taskset import GeneratedTaskSet, TaskSampler

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & MASK
        return z ^ (z >> np.uint64(31))


def normals(task: np.ndarray, count: int, stream: int) -> np.ndarray:
    """``count`` standard normals per task, a pure function of (task, stream, position) — Box–Muller."""
    key = (task.astype(np.uint64)[:, None] * np.uint64(1 << 20) + np.uint64(stream << 16)
           + np.arange(2 * count, dtype=np.uint64)[None, :])
    u = (splitmix(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    u1, u2 = np.clip(u[:, :count], 1e-300, 1.0), u[:, count:]
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def make_family(n: int, d: int):
    theta0 = normals(np.array([n + 7]), d + 1, 9)[0]

    def make(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = normals(idx, n * d, 1).reshape(len(idx), n, d)
        th = theta0 + 0.5 * normals(idx, d + 1, 2)
        y = np.einsum("bnd,bd->bn", x, th[:, :d]) + th[:, d:] + 0.1 * normals(idx, n, 3)
        return torch.from_numpy(x).float(), torch.from_numpy(y).float().unsqueeze(2)

    return make, theta0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--commit-every", type=int, default=50)
    ap.add_argument("--dir", default="/tmp/metaprox-scale")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    make, theta0 = make_family(args.examples, args.features)
    ts = GeneratedTaskSet(args.tasks, args.examples, make)
    torch.manual_seed(0)
    model = torch.nn.Linear(args.features, 1)
    layout = ParamLayout.of(["weight", "bias"], [model.weight, model.bias])
    path = Path(args.dir)
    if path.exists():
        shutil.rmtree(path)
    t0 = time.perf_counter()
    store = MemmapStore.create(path, layout, args.tasks)
    t_create = time.perf_counter() - t0
    fm = FiniteMMP(model, ts, "mse", lam=args.lam, inner=metaprox.ExactLeastSquares(), store=store,
                   sampler=TaskSampler(args.tasks, args.batch, seed=0), outer_lr=1.0 / args.lam)
    steps_per_epoch = -(-args.tasks // args.batch)
    epochs = []
    for e in range(args.epochs):
        t0 = time.perf_counter()
        for k in range(steps_per_epoch):
            fm.step(monitor=False)
            if (k + 1) % args.commit_every == 0:
                fm.commit()
        fm.commit()
        dt = time.perf_counter() - t0
        dist = float(np.linalg.norm(fm.w_row().double().numpy() - theta0))
        epochs.append({"seconds": dt, "tasks_per_s": args.tasks / dt, "us_per_task": 1e6 * dt / args.tasks,
                       "center_dist_to_theta0": dist})
        print(f"epoch {e}: {dt:.1f}s, {args.tasks / dt:,.0f} tasks/s, ‖w − θ₀‖ = {dist:.4f}", flush=True)
    del fm, store
    t0 = time.perf_counter()
    reopened = MemmapStore.open(path, verify=True)
    t_open = time.perf_counter() - t0
    seen = int(reopened.initialized(np.arange(args.tasks)).sum())
    size = (path / "params.f32").stat().st_size
    result = {"args": vars(args), "create_s": t_create, "epochs": epochs, "reopen_verify_s": t_open,
              "initialized_tasks": seen, "store_bytes": size, "bytes_per_task": size / args.tasks,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(path)


if __name__ == "__main__":
    main()
