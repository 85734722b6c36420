"""Peak memory of one meta-iteration against the number of inner steps M, for every rule.

A thin command line over :mod:`metaprox.bench.memory` (fresh subprocess per point, peak RSS increase of one
meta-iteration after a ``clear_refs`` reset), on the standard sine setting of :mod:`metaprox.bench.rules`.
B is large (default 300 tasks × 10+10 points) so that tensors, not the allocator's noise, dominate.

    PYTHONPATH=src python benchmarks/memory_vs_steps.py [--tasks 300] [--steps 1,5,15,50,100] [--out DIR]

Writes ``DIR/memory_vs_steps.json`` and ``DIR/memory_vs_steps.png`` (default DIR: benchmarks/results).
Linux only (needs /proc).
"""

from __future__ import annotations

import argparse
import json
import os

from metaprox.bench.memory import ENV, memory_vs_steps, plot_memory

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", default="1,5,15,50,100")
    ap.add_argument("--rules", default="mmp,maml,maml_fo,fomaml,reptile,imaml")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    specs = {r: {"rule": r, "k": args.k} for r in args.rules.split(",")}
    points = memory_vs_steps(specs, steps, args.tasks, log=lambda m: print(m, flush=True))
    os.makedirs(args.out, exist_ok=True)
    meta = {"tasks": args.tasks, "k": args.k, "model": "MLP 1-40-40-1 tanh", "inner": "SGD lr 0.02", "env": ENV,
            "measure": "VmHWM - VmRSS after clear_refs reset, one meta-iteration, fresh process per point"}
    with open(os.path.join(args.out, "memory_vs_steps.json"), "w") as f:
        json.dump({"config": meta, "points": points}, f, indent=1)
    plot_memory(points, os.path.join(args.out, "memory_vs_steps.png"),
                f"B = {args.tasks} sine tasks, K = {args.k}+{args.k}, {meta['model']}")
    print("wrote", os.path.join(args.out, "memory_vs_steps.json"), "and .png")


if __name__ == "__main__":
    main()
