"""Pick each method's hyperparameters on validation across several runs of the same experiment, report its test.

Each run of experiments/omniglot_robust.py or experiments/omniglot_alphabets.py searches one grid and reports
the test accuracy of its validation-best setting per method. When a grid was extended by a later run (e.g. smaller
λ), the fair choice is the validation-best over the union: this script takes, per method (and blank fraction),
the run whose chosen setting has the highest validation score and prints that setting with its test accuracy.
Test numbers are never used to choose.

    python experiments/select_on_validation.py robust reports/beyond/omniglot_robust.json reports/beyond/…
    python experiments/select_on_validation.py alphabets reports/beyond/omniglot_alphabets.json …
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _robust(files: list[Path]) -> list[str]:
    best: dict[tuple[str, str], tuple[float, dict, str]] = {}
    for f in files:
        d = json.loads(f.read_text())
        for blank, methods in d["test"].items():
            for variant, chosen in methods.items():
                val = max(r["val_acc"] for r in d["validation"] if str(r["blank"]) == blank
                          and r["variant"] == variant and r["lam"] == chosen["lam"]
                          and r["interp"] == chosen["interp"] and (r["delta"] or None) == chosen["delta"])
                key = (blank, variant)
                if key not in best or val > best[key][0]:
                    best[key] = (val, chosen, f.name)
    rows = ["| blank fraction | learner | λ | δ | ηλ | validation % | test % (95 % CI) | from |",
            "|---|---|---|---|---|---|---|---|"]
    for (blank, variant), (val, c, name) in sorted(best.items()):
        rows.append(f"| {blank} | {variant} | {c['lam']:g} | {c['delta'] or '–'} | {c['interp']:g} | {100 * val:.2f} | "
                    f"{100 * c['acc']:.2f} ± {100 * c['ci95']:.2f} | {name} |")
    return rows


def _alphabets(files: list[Path]) -> list[str]:
    best: dict[str, tuple[float, dict, str]] = {}
    for f in files:
        d = json.loads(f.read_text())
        for kind, chosen in d["test"].items():
            lg = chosen["lam_group"] if kind == "hierarchical" else 0.0
            val = max((r["val_seen"] + r["val_unseen"]) / 2 for r in d["validation"] if r["kind"] == kind
                      and r["lam"] == chosen["lam"] and r["lam_group"] == lg and r["interp"] == chosen["interp"])
            if kind not in best or val > best[kind][0]:
                best[kind] = (val, chosen, f.name)
    rows = ["| prior | λ | λ_group | ηλ | validation % (mean) | new characters of seen alphabets % "
            "| unseen alphabets % | from |", "|---|---|---|---|---|---|---|---|"]
    for kind, (val, c, name) in sorted(best.items()):
        s, u = c["test_seen"], c["test_unseen"]
        rows.append(f"| {kind} | {c['lam']:g} | {c['lam_group'] if c['lam_group'] is not None else '–'} | "
                    f"{c['interp']:g} | {100 * val:.2f} | {100 * s['acc']:.2f} ± {100 * s['ci95']:.2f} | "
                    f"{100 * u['acc']:.2f} ± {100 * u['ci95']:.2f} | {name} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["robust", "alphabets"])
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    print("\n".join(_robust(args.files) if args.experiment == "robust" else _alphabets(args.files)))


if __name__ == "__main__":
    main()
