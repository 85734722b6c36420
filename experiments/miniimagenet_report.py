"""Markdown tables of pretrain-then-meta-train runs (reports/miniimagenet): training time, the validation
time-to-accuracy curve (pretraining prototype score, then MMP adaptation), and every evaluation file's accuracy
with its 95 % CI and episode count — each BatchNorm protocol in its own row, never mixed.

    python experiments/miniimagenet_report.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _bn(name: str) -> str:
    return "plain" if name == "batch" else name


def _pct(row: dict) -> str:
    return f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_ci95']:.2f}"


def report(run: Path) -> list[str]:
    cfg = json.loads((run / "config.json").read_text())["config"]
    pre = json.loads((run / "pretrain.json").read_text()) if (run / "pretrain.json").is_file() else None
    metrics = _rows(run / "metrics.jsonl")
    total = metrics[-1]["time"] if metrics else (pre["seconds"] if pre else 0.0)
    out = [f"### {run.name} — {cfg['name']}", ""]
    if pre:
        src = f" (the backbone of {pre['source']})" if "source" in pre else ""
        out.append(f"- pretraining{src}: {pre['seconds'] / 60:.1f} min, {pre['epochs']:.2f} epochs of "
                   f"{pre['images']} images / {pre['classes']} classes; selected step {pre['step']} "
                   f"(validation prototype accuracy {100 * pre['val_prototype_accuracy']:.2f} % on "
                   f"{pre['val_tasks']} episodes)")
    steps = metrics[-1]["step"] if metrics else 0
    out.append(f"- MMP meta-training: {steps} outer steps; training time in all **{total / 60:.1f} min** "
               f"(pretraining + meta-training, validation excluded)")
    out += ["", "| phase | step | training time (min) | validation accuracy % (episodes) |", "|---|---|---|---|"]
    for r in _rows(run / "pretrain_curve.jsonl"):
        out.append(f"| pretraining (nearest-centroid score) | {r['step']} | {r['time'] / 60:.1f} | "
                   f"{100 * r['val_prototype_accuracy']:.2f} ({r['val_tasks']}) |")
    for r in _rows(run / "val_curve.jsonl"):
        cells = ", ".join(f"{s} steps: {100 * a:.2f}" for name, acc in r["accuracy"].items() for s, a in acc.items())
        out.append(f"| MMP adaptation ({_bn(cfg['eval']['bn'] or cfg['model']['bn'])} BN) | {r['step']} | "
                   f"{r['time'] / 60:.1f} | {cells} ({cfg['log']['eval_tasks']}) |")
    if not _all_steps(run):
        return out + [""]
    out += ["", "| evaluation | BN | " + " | ".join(f"{s} steps" for s in _all_steps(run)) + " | episodes |",
            "|---|---|" + "---|" * (len(_all_steps(run)) + 1)]
    for f in sorted(run.glob("eval*.json")):
        res = json.loads(f.read_text())
        bn = res["test_time"].get("bn") or cfg["model"]["bn"]
        for name, rows in res["sets"].items():
            cells = [(_pct(rows[str(s)]) if str(s) in rows else "–") for s in _all_steps(run)]
            tasks = int(rows[str(res["steps"][0])]["tasks"])
            out.append(f"| {res['split']} {name} (`{f.name}`) | {_bn(bn)} | "
                       + " | ".join(cells) + f" | {tasks} |")
    return out + [""]


def _all_steps(run: Path) -> list[int]:
    return sorted({s for f in run.glob("eval*.json") for s in json.loads(f.read_text())["steps"]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    for run in p.parse_args().runs:
        print("\n".join(report(run)))


if __name__ == "__main__":
    main()
