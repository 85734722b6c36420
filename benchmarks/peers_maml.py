"""Second-order MAML of peer libraries (``higher``, ``torchopt``) timed next to ours on the same sine setting.

Neither library is a dependency of metaprox: the script uses whichever is importable (e.g. installed
with ``pip install --no-deps --target DIR higher torchopt optree`` and put on PYTHONPATH, which keeps
the venv's torch) and says what is missing otherwise. Each peer runs its canonical per-task MAML loop
(``higher.innerloop_ctx``; ``torchopt.MetaSGD`` with ``extract_state_dict``/``recover_state_dict``); all
compute the same meta-gradient of the mean post-adaptation query loss, which the script checks against
ours before timing.

    PYTHONPATH=src python benchmarks/peers_maml.py [--tasks 100] [--steps 15] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sine import make_rule, sine_batch  # noqa: E402

import metaprox  # noqa: E402


def _ours(learner: metaprox.MetaLearner, tasks) -> list[torch.Tensor]:
    a = torch.full((len(tasks),), 1.0 / len(tasks), dtype=torch.float64)
    return learner.solve_and_meta_gradient(tasks, learner.center(), a, monitor=False)[1]


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred - y).square().mean()


def _higher(model: torch.nn.Module, tasks, lr: float, steps: int) -> list[torch.Tensor]:
    import higher

    model.zero_grad()
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in tasks:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(_mse(fmodel(t.x), t.y))
            (_mse(fmodel(t.x_query), t.y_query) / len(tasks)).backward()
    return [p.grad.clone() for p in model.parameters()]


def _torchopt(model: torch.nn.Module, tasks, lr: float, steps: int) -> list[torch.Tensor]:
    import torchopt

    model.zero_grad()
    inner_opt = torchopt.MetaSGD(model, lr=lr)
    start = torchopt.extract_state_dict(model)
    for t in tasks:
        for _ in range(steps):
            inner_opt.step(_mse(model(t.x), t.y))
        (_mse(model(t.x_query), t.y_query) / len(tasks)).backward()
        torchopt.recover_state_dict(model, start)
    return [p.grad.clone() for p in model.parameters()]


def _median_times(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call; rounds interleave the implementations so that machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peers = {"higher": _higher, "torchopt": _torchopt}
    available = {n: f for n, f in peers.items() if importlib.util.find_spec(n) is not None}
    missing = sorted(set(peers) - set(available))
    if missing:
        print(f"not importable (optional, skipped): {', '.join(missing)}")
    if not available:
        print("no peer library to compare with; nothing to do.")
        return
    tasks = sine_batch(args.tasks, args.k)
    ours = {ex: make_rule("maml", steps=args.steps, lr=args.lr, execution=ex) for ex in ("batched", "vmap")}
    ref = _ours(ours["batched"], tasks)
    fns = {f"metaprox MAML ({ex})": (lambda lr=lr: _ours(lr, tasks)) for ex, lr in ours.items()}
    for name, fn in available.items():
        model = make_rule("maml", steps=args.steps, lr=args.lr).model  # same seed → same initial weights
        g = fn(model, tasks, args.lr, args.steps)
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, ref, strict=True))
        if err > 1e-3:
            raise SystemExit(f"{name}: meta-gradient differs from ours (max rel. error {err:.2e}); "
                             f"not timing.")
        version = getattr(sys.modules[name], "__version__", "")
        fns[f"{name} {version} (max rel. diff {err:.1e})"] = (
            lambda fn=fn, model=model: fn(model, tasks, args.lr, args.steps))
    rows = _median_times(fns, args.rounds)
    best = rows["metaprox MAML (batched)"]
    print(f"second-order MAML, B = {args.tasks}, K = {args.k}+{args.k}, M = {args.steps}, "
          f"MLP 1-40-40-1 tanh, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds}\n")
    print("| implementation | ms / meta-gradient | tasks/s | time / metaprox batched |")
    print("|---|---:|---:|---:|")
    for name, t in rows.items():
        print(f"| {name} | {t * 1e3:.1f} | {args.tasks / t:.0f} | {t / best:.1f}× |")


if __name__ == "__main__":
    main()
