"""Time-budgeted few-shot training (CPU or GPU): calibrate speed, size S to the budget, train, evaluate.

    python benchmarks/budgeted_fewshot.py CONFIG --out DIR --minutes 6.5 [--set key=value ...]

Runs a few outer iterations to measure seconds per iteration (with whatever else shares the GPU), sets
``outer.steps`` so that training fits ``--minutes`` (the linear decay then ends on time), trains with the
ordinary ``train()`` (checkpoints, metrics, plots), and evaluates on validation and test episodes (``--splits val``
while tuning: test episodes are then never touched). The run
directory's ``config.json`` records the S that was used; ``summary.json`` the measured speed and results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--calibrate", type=int, default=100, help="outer iterations timed to size S")
    p.add_argument("--splits", default="val,test", help="evaluation splits after training (tuning: val)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    from metaprox.build import build_family, build_learner
    from metaprox.config import load_config
    from metaprox.evaluate import evaluate_run
    from metaprox.plots import plot_run
    from metaprox.train import train

    cfg = load_config(args.config, args.overrides)
    learner, family = build_learner(cfg), build_family(cfg)
    g = torch.Generator().manual_seed(12345)
    mb = cfg["outer"]["meta_batch"]
    for _ in range(10):  # warm-up: lazy init, allocator, and whatever else is still starting up
        learner.step(family.train_batch(mb, g), monitor=False)
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.calibrate):
        learner.step(family.train_batch(mb, g), monitor=False)
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
    per_it = (time.perf_counter() - t0) / args.calibrate
    steps = max(10, int(0.9 * args.minutes * 60 / per_it))
    del learner
    cfg["outer"]["steps"] = steps
    cfg["log"]["checkpoint_every"] = max(1, steps // 4)
    cfg["log"]["every"] = max(1, steps // 40)
    print(f"[{cfg['name']}] {1e3 * per_it:.1f} ms/iteration → S = {steps}", flush=True)
    t1 = time.perf_counter()
    splits = [s for s in args.splits.split(",") if s]
    train(cfg, args.out, progress=False, max_seconds=args.minutes * 60 * 1.15, evaluate=False)
    train_s = time.perf_counter() - t1
    results = {split: evaluate_run(args.out, split=split) for split in splits}
    summary = {"name": cfg["name"], "ms_per_iteration": 1e3 * per_it, "steps_planned": steps,
               "train_seconds": train_s, "step": next(iter(results.values()))["step"],
               **{split: r["sets"] for split, r in results.items()}}
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    plot_run(args.out)
    print(json.dumps({k: summary[k] for k in ("name", "ms_per_iteration", "steps_planned", "train_seconds")}))
    for split in splits:
        for name, rows in summary[split].items():
            best = max((r["accuracy"], k) for k, r in rows.items() if isinstance(r, dict))
            print(f"[{cfg['name']}] {split} {name}: " + ", ".join(
                f"{k} steps {100 * r['accuracy']:.2f} ± {100 * r['accuracy_ci95']:.2f}"
                for k, r in rows.items() if isinstance(r, dict)) + f" (best {100 * best[0]:.2f} at {best[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
