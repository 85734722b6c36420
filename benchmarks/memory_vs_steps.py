"""Peak memory of one meta-iteration against the number of inner steps M, for every rule.

Each (rule, M) point runs in a fresh subprocess: it builds the model, the rule and B sine tasks, warms
the code paths up on a 2-task batch with M = 1, then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), takes the current RSS as baseline and runs one meta-iteration on the full
batch; the point is ``VmHWM − baseline`` (the peak resident-set increase). B is large (default 300 tasks
× 10+10 points) so that tensors, not the allocator's noise, dominate. First-order rules (MMP, FOMAML,
Reptile, first-order MAML, iMAML) should be flat in M; second-order MAML keeps every step's activations
and grows linearly.

    PYTHONPATH=src python benchmarks/memory_vs_steps.py [--tasks 300] [--steps 1,5,15,50,100] [--out DIR]

Writes ``DIR/memory_vs_steps.json`` and ``DIR/memory_vs_steps.png`` (default DIR: benchmarks/results).
Linux only (needs /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def child(rule: str, steps: int, tasks: int, k: int) -> None:
    import torch

    sys.path.insert(0, HERE)
    from _sine import make_rule, sine_batch

    torch.set_num_threads(1)
    learner = make_rule(rule, steps=steps)
    batch = sine_batch(tasks, k)
    warm = make_rule(rule, steps=1)
    warm.step(sine_batch(2, k, seed=1), monitor=False)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    learner.step(batch, monitor=False)
    peak = _status_kib("VmHWM")
    print(json.dumps({"rule": rule, "steps": steps, "peak_increase_mib": (peak - base) / 1024,
                      "baseline_mib": base / 1024}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", default="1,5,15,50,100")
    ap.add_argument("--rules", default="mmp,maml,maml_fo,fomaml,reptile,imaml")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", nargs=2, metavar=("RULE", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.tasks, args.k)
        return
    steps = [int(s) for s in args.steps.split(",")]
    rules = args.rules.split(",")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    points = []
    for r in rules:
        for m in steps:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", r, str(m),
                   "--tasks", str(args.tasks), "--k", str(args.k)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            points.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{r:8s} M={m:4d}  peak +{points[-1]['peak_increase_mib']:8.1f} MiB", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"tasks": args.tasks, "k": args.k, "model": "MLP 1-40-40-1 tanh", "inner": "SGD lr 0.02",
            "measure": "VmHWM - VmRSS after clear_refs reset, one meta-iteration, fresh process per point"}
    with open(os.path.join(args.out, "memory_vs_steps.json"), "w") as f:
        json.dump({"config": meta, "points": points}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rules:
        pts = [p for p in points if p["rule"] == r]
        ax.plot([p["steps"] for p in pts], [p["peak_increase_mib"] for p in pts], marker="o", label=r)
    ax.set_xscale("log")
    ax.set_xlabel("inner steps M")
    ax.set_ylabel("peak RSS increase of one meta-iteration (MiB)")
    ax.set_title(f"B = {args.tasks} sine tasks, K = {args.k}+{args.k}, {meta['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "memory_vs_steps.png"), dpi=120)
    print("wrote", os.path.join(args.out, "memory_vs_steps.json"), "and .png")


if __name__ == "__main__":
    main()
