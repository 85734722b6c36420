"""Peak memory of one ResNet-12 meta-iteration against the number of inner steps M, per rule.

Setting (issue 11): 5-way 5-shot, 15 queries per class, 84×84×3 random images, meta-batch 2, ResNet-12
(64-160-320-640, batch-statistics BatchNorm), one fresh process per point (:mod:`metaprox.bench.memory`: peak
RSS increase of one meta-iteration over the RSS just before it). First-order rules (MMP, FOMAML, Reptile, iMAML)
keep no graph across inner steps; second-order MAML keeps all M steps' graphs, so its memory is fitted by a
line in M (least squares over the measured points) and the M at which baseline + peak exceeds this machine's
memory (MemTotal) is extrapolated from that line. Every point not measured is labelled "extrapolated".

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/resnet12_memory.py \\
        [--steps 1,5] [--maml-steps 1,2,3] [--report M=1,5,10,20] [--out benchmarks/results]

Each ResNet-12 inner step costs ~1 TFLOP here (2 tasks × 25 images × ~20 GFLOP forward + backward), so the
defaults measure few points on a small CPU; on a larger machine pass ``--steps 1,5,10,20 --maml-steps 1,5,10``.
"""

from __future__ import annotations

import argparse
import json
import os

from metaprox.bench.fewshot_memory import FEWSHOT_RULES
from metaprox.bench.memory import ENV, memory_vs_steps

HERE = os.path.dirname(os.path.abspath(__file__))
SETTING = {"model": "resnet12", "ways": 5, "shots": 5, "queries": 15, "channels": 3, "size": 84}


def _mem_total_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("MemTotal not in /proc/meminfo")


def _fit(points: list[dict]) -> tuple[float, float]:
    """Least-squares line peak = a + b·M through the measured points (b = 0 for a single point)."""
    xs, ys = [p["steps"] for p in points], [p["peak_increase_mib"] for p in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if n > 1 and sxx > 0 else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1,5", help="M measured for the first-order rules")
    ap.add_argument("--maml-steps", default="1,2,3", help="M measured for second-order MAML")
    ap.add_argument("--report", default="1,5,10,20", help="M of the table (unmeasured ones are extrapolated)")
    ap.add_argument("--rules", default=",".join(FEWSHOT_RULES))
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per point")
    ap.add_argument("--size", type=int, default=84, help="image side (84 for miniImageNet)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    setting = {**SETTING, "size": args.size}
    points = []
    for rule in args.rules.split(","):
        steps = args.maml_steps if rule == "maml" else args.steps
        points += memory_vs_steps({rule: {"fewshot": setting, "rule": rule}}, [int(m) for m in steps.split(",")],
                                  args.tasks, log=lambda m: print(m, flush=True), timeout=args.timeout)
    total = _mem_total_mib()
    report = [int(m) for m in args.report.split(",")]
    lines = [f"ResNet-12, {SETTING['ways']}-way {SETTING['shots']}-shot + {SETTING['queries']} queries/class, "
             f"{args.size}×{args.size}, meta-batch {args.tasks}: peak RSS increase of one meta-iteration (MiB), "
             f"fresh process per point; *italic* = extrapolated (flat for first-order rules: the mean of the "
             f"measured points; MAML: the least-squares line through its measured points).", "",
             "| rule | " + " | ".join(f"M = {m}" for m in report) + " | MiB per extra step (fit) |",
             "|---|" + "---:|" * (len(report) + 1)]
    fits = {}
    for rule in dict.fromkeys(p["label"] for p in points):
        pts = [p for p in points if p["label"] == rule]
        a, b = _fit(pts) if rule == "maml" else (sum(p["peak_increase_mib"] for p in pts) / len(pts), 0.0)
        fits[rule] = {"intercept_mib": a, "slope_mib_per_step": b,
                      "baseline_mib": max(p["baseline_mib"] for p in pts)}
        measured = {p["steps"]: p["peak_increase_mib"] for p in pts}
        cells = [f"{measured[m]:.0f}" if m in measured else f"*{a + b * m:.0f}*" for m in report]
        slope = (_fit(pts)[1] if len(pts) > 1 else float("nan"))
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {slope:.0f} |")
    if "maml" in fits and fits["maml"]["slope_mib_per_step"] > 0:
        f = fits["maml"]
        m_max = (total - f["baseline_mib"] - f["intercept_mib"]) / f["slope_mib_per_step"]
        fits["maml"]["max_steps_fitting"] = m_max
        lines += ["", f"Second-order MAML needs ~{f['slope_mib_per_step']:.0f} MiB more per inner step; with the "
                      f"process baseline ({f['baseline_mib']:.0f} MiB) it exceeds this machine's "
                      f"{total / 1024:.1f} GiB (MemTotal) from M ≈ {m_max:.0f} on (extrapolated from M = "
                      f"{args.maml_steps})."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "resnet12_memory.json"), "w") as fh:
        json.dump({"setting": setting, "tasks": args.tasks, "env": ENV, "mem_total_mib": total, "points": points,
                   "fits": fits}, fh, indent=1)
    with open(os.path.join(args.out, "resnet12_memory.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
