"""Write ``examples/byo_tasks.csv``: a small multi-task regression table of the everyday kind.

40 stores (tasks) of very different sizes (8 to 150 weeks each), 5 numeric features, target ``sales``. Each
store's coefficients are a shared vector plus a store-specific deviation, and each store has its own level, so
pooling ignores real differences and fitting every store alone overfits the small ones — the situation a
learned center with a per-task pull is for. Deterministic (seed 0):

    python examples/make_byo_tasks.py            # rewrites examples/byo_tasks.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

FEATURES = ["price", "promo", "temperature", "holiday", "competitors"]


def rows(seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    shared = np.array([-2.0, 1.5, 0.6, 1.0, -0.8])
    out = []
    for s in range(40):
        n = int(np.round(np.exp(rng.uniform(np.log(8), np.log(150)))))
        coef = shared + 0.25 * rng.normal(size=len(FEATURES))
        level = 20.0 + 3.0 * rng.normal()
        x = rng.normal(size=(n, len(FEATURES)))
        x[:, 3] = rng.random(n) < 0.15  # holiday: a 0/1 column
        y = level + x @ coef + 1.5 * rng.normal(size=n)
        out += [[f"store_{s:02d}", *(f"{v:.4f}" for v in xi), f"{yi:.4f}"] for xi, yi in zip(x, y, strict=True)]
    return out


def main(path: Path | None = None) -> Path:
    path = path or Path(__file__).with_name("byo_tasks.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["store", *FEATURES, "sales"])
        w.writerows(rows())
    return path


if __name__ == "__main__":
    print(main())
