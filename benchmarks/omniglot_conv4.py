"""Benchmark: one Meta-MinibatchProx iteration on Omniglot-shaped Conv-4 tasks, per execution strategy.

Setting (issue 4): 5 tasks per meta-batch, 5-way, 6 support images per class (30 per task), 28×28 greyscale,
Conv-4 with 32 filters and batch-statistics BatchNorm, 8 inner Adam steps with beta1 = 0, MMP outer step.
Variants are timed *interleaved* (round-robin, median of ``--reps``) so that load from other
processes hits all of them alike; the speedups printed are ratios of medians measured in this one run.

    PYTHONPATH=src python benchmarks/omniglot_conv4.py [--reps 3] [--threads 1] [--data PATH/omniglot28.npz]

Uses real Omniglot episodes when ``--data`` (or ``$METAPROX_DATA/omniglot/omniglot28.npz``) exists, else
random images of the same shape (timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import metaprox
from metaprox.models.conv4 import Conv4

TASKS, WAYS, SHOTS, STEPS, FILTERS, SIZE = 5, 5, 6, 8, 32, 28


def make_tasks(data: Path | None, seed: int) -> tuple[list[metaprox.Task], str]:
    gen = torch.Generator().manual_seed(seed)
    if data is not None and data.is_file():
        from metaprox.data import load_omniglot_npz
        from metaprox.tasks.episodes import EpisodeSampler

        images = load_omniglot_npz(data)
        sampler = EpisodeSampler(
            images, images.classes_where("split", "background"), WAYS, SHOTS, 0, rotations=True
        )
        return sampler.sample(TASKS, gen), f"Omniglot episodes from {data}"
    tasks = [
        metaprox.Task(
            torch.rand(WAYS * SHOTS, 1, SIZE, SIZE, generator=gen),
            torch.arange(WAYS).repeat_interleave(SHOTS),
        )
        for _ in range(TASKS)
    ]
    return tasks, "random 28×28 images (no Omniglot file found)"


def make_learner(execution: str, channels_last: bool) -> metaprox.MetaMinibatchProx:
    torch.manual_seed(0)
    model = Conv4(1, WAYS, FILTERS, SIZE, bn="batch", channels_last=channels_last)
    return metaprox.MetaMinibatchProx(
        model,
        "cross_entropy",
        lam=0.5,
        inner=metaprox.Adam(lr=1e-3, steps=STEPS, beta1=0.0),
        outer_lr=1.0,
        execution=execution,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data
    if data is None and os.environ.get("METAPROX_DATA"):
        data = Path(os.environ["METAPROX_DATA"]) / "omniglot" / "omniglot28.npz"
    tasks, source = make_tasks(data, 0)
    variants = {
        f"{ex}{'+channels_last' if cl else ''}": (ex, cl)
        for ex in ("loop", "batched", "vmap")
        for cl in (False, True)
    }
    learners = {name: make_learner(ex, cl) for name, (ex, cl) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for mmp in learners.values():  # warm-up (allocator, mkldnn primitives, vmap tracing)
        mmp.step(tasks, monitor=False)
    for _ in range(args.reps):
        for name, mmp in learners.items():
            t0 = time.perf_counter()
            mmp.step(tasks, monitor=False)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["loop"]
    print(
        f"MMP iteration: {TASKS} tasks × {WAYS}-way × {SHOTS} shots, Conv-4/{FILTERS}, {SIZE}×{SIZE}, "
        f"{STEPS} Adam steps (beta1=0); torch {torch.__version__}, {args.threads} thread(s); data: {source}"
    )
    print(f"{'variant':28s} {'median ms/iter':>15s} {'min':>8s} {'speedup vs loop':>16s}")
    for name in variants:
        print(f"{name:28s} {med[name]:15.1f} {min(times[name]):8.1f} {base / med[name]:15.2f}×")


if __name__ == "__main__":
    main()
