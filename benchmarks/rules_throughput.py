"""Tasks per second of every meta-gradient rule, side by side, on the same sine setting and engine.

A thin command line over :mod:`metaprox.bench.rules` (also ``metaprox bench rules``): B sine tasks (K support +
K query points), MLP 1-40-40-1 tanh, M inner SGD steps of lr 0.02; one outer step of each rule per round,
rounds interleaved; the median over rounds is reported.

    PYTHONPATH=src python benchmarks/rules_throughput.py [--tasks 100] [--steps 15] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from metaprox.bench.rules import RULES, make_rule, sine_batch, throughput_markdown, throughput_rows, time_rules


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
    learners = {r: make_rule(r, steps=args.steps, execution=args.execution) for r in rules}
    times = time_rules(learners, sine_batch(args.tasks, args.k), args.rounds)
    print(f"B = {args.tasks} tasks, K = {args.k}+{args.k}, M = {args.steps} inner SGD steps, MLP 1-40-40-1 tanh, "
          f"torch {torch.__version__}, {args.threads} thread(s), execution={args.execution}, "
          f"median of {args.rounds} rounds\n")
    print(throughput_markdown(throughput_rows(times, learners, args.tasks)))


if __name__ == "__main__":
    main()
