"""Tasks per second of every meta-gradient rule, side by side, on the same sine setting and engine.

B sine tasks (K support + K query points), MLP 1-40-40-1 tanh, M inner SGD steps of lr 0.02; one outer
step of each rule per round, rounds interleaved (rule order rotated) so that machine noise hits every
rule alike; the median over rounds is reported. Diagnostics (``monitor``) are off: the table times the
algorithms, not the monitors.

    PYTHONPATH=src python benchmarks/rules_throughput.py [--tasks 100] [--steps 15] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sine import RULES, make_rule, sine_batch  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100, help="tasks per meta-batch (B)")
    ap.add_argument("--k", type=int, default=10, help="support (= query) points per task")
    ap.add_argument("--steps", type=int, default=15, help="inner SGD steps (M)")
    ap.add_argument("--rounds", type=int, default=7, help="timed outer steps per rule")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--execution", default="auto", choices=["auto", "batched", "vmap", "loop"])
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated subset of " + ",".join(RULES))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",")
    tasks = sine_batch(args.tasks, args.k)
    learners = {r: make_rule(r, steps=args.steps, execution=args.execution) for r in rules}
    for r in rules:  # warm-up (lazy initialisation, allocator)
        learners[r].step(tasks, monitor=False)
    times: dict[str, list[float]] = {r: [] for r in rules}
    for i in range(args.rounds):
        order = rules[i % len(rules):] + rules[:i % len(rules)]
        for r in order:
            t0 = time.perf_counter()
            learners[r].step(tasks, monitor=False)
            times[r].append(time.perf_counter() - t0)
    ref = statistics.median(times["mmp"]) if "mmp" in times else None
    print(f"B = {args.tasks} tasks, K = {args.k}+{args.k}, M = {args.steps} inner SGD steps, "
          f"MLP 1-40-40-1 tanh, "
          f"torch {torch.__version__}, {args.threads} thread(s), execution={args.execution}, "
          f"median of {args.rounds} rounds\n")
    print("| rule | path | ms / meta-iteration | tasks/s | time vs MMP |")
    print("|---|---|---:|---:|---:|")
    for r in rules:
        med = statistics.median(times[r])
        path = learners[r].execution.resolve(torch.zeros(1, 1, 1))
        rel = f"{med / ref:.2f}×" if ref else "–"
        print(f"| {r} | {path} | {med * 1e3:.1f} | {args.tasks / med:.0f} | {rel} |")


if __name__ == "__main__":
    main()
