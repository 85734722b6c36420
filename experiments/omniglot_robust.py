"""Robust vs plain MMP when some training images are blank (the paper's robustness experiment, on Omniglot).

A fraction ``--blank`` of the images of every *training* class is replaced by a blank image (no ink) that keeps
its label: a task whose support set holds blanks asks the model to give one input several labels, its inner
solution is pulled away from the prior, and with the plain pull λ/2‖v − w‖² it moves the prior as much as any
other task. The robust pull (λ/2)·δ²·log(1 + ‖v − w‖²/δ²) (:class:`~metaprox.prox.RobustL2`) bounds each task's
envelope gradient by λδ/2, so far-off solutions move the prior less.

Setting (as experiments/omniglot_alphabets.py, one CPU thread): 14×14 images flattened, MLP 196→h→h→5, inner
SGD with momentum, outer SGD with ηλ linearly decayed; both variants see the same episodes. λ, δ and the outer
step ηλ (``--interps``) are chosen on validation for each variant: the robust pull damps the meta-gradient, so
comparing at one untuned step would mostly measure the step.
Classes: background characters (964) — the last 20 % held out *clean* for validation (choosing λ and δ per
variant), the rest for training (with blanks); test: the evaluation characters (659, clean), 5-way 1-shot.

    python experiments/omniglot_robust.py --data ../shared/data/omniglot --out reports/beyond/omniglot_robust.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omniglot_alphabets import add_common_arguments, make_model, query_accuracy
from omniglot_mixed_way import downsample, flat_tasks

import metaprox
from metaprox.data.labelled import LabelledImages
from metaprox.data.omniglot import load_omniglot_npz
from metaprox.prox import RobustL2
from metaprox.tasks.episodes import EpisodeSampler


def with_blanks(data: LabelledImages, classes: list[int], frac: float, seed: int) -> LabelledImages:
    """A copy of ``data`` where ⌈frac·n⌉ of the n images of every class in ``classes`` are blank (all zero)."""
    rng = np.random.default_rng(seed)
    images = data.images.copy()
    for c in classes:
        rows = np.flatnonzero(data.labels == c)
        k = int(np.ceil(frac * len(rows))) if frac > 0 else 0
        images[rng.choice(rows, size=k, replace=False)] = 0
    return LabelledImages(images, data.labels, data.class_names, data.class_meta, data.name)


def build(variant: str, lam: float, delta: float, interp: float, args) -> metaprox.MetaLearner:
    model = make_model(args.hidden, args.seed)
    names = [n for n, _ in model.named_parameters()]
    penalty = lam if variant == "plain" else RobustL2(lam, names, scale=delta)
    return metaprox.MetaMinibatchProx(
        model, "cross_entropy", lam=penalty, inner=metaprox.SGD(lr=args.inner_lr, steps=args.inner_steps,
                                                                 momentum=args.momentum),
        outer_lr=interp / lam, total_steps=args.steps, seed=args.seed)


def train(variant: str, lam: float, delta: float, interp: float, sampler: EpisodeSampler,
          args) -> metaprox.MetaLearner:
    ln = build(variant, lam, delta, interp, args)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        ln.step(flat_tasks(sampler, args.meta_batch, gen), monitor=False)
    return ln


def evaluate(ln: metaprox.MetaLearner, sampler: EpisodeSampler, n: int, args, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    accs = [query_accuracy(ln, ln.adapt(t, steps=args.eval_steps), t) for t in flat_tasks(sampler, n, gen)]
    return metaprox.mean_ci(accs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap)
    ap.add_argument("--blank", type=float, nargs="+", default=[0.05, 0.2], help="blank fraction per class")
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.5, 2.0], help="robust scale δ grid")
    ap.add_argument("--variants", nargs="+", default=["plain", "robust"], choices=["plain", "robust"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = downsample(load_omniglot_npz(Path(args.data) / "omniglot28.npz"))
    background = data.classes_where("split", "background")
    cut = int(0.8 * len(background))
    fit, val = background[:cut], background[cut:]
    test = data.classes_where("split", "evaluation")
    val_s, test_s = EpisodeSampler(data, val, 5, 1, args.queries), EpisodeSampler(data, test, 5, 1, args.queries)
    results, table = {}, []
    for frac in args.blank:
        train_s = EpisodeSampler(with_blanks(data, fit, frac, args.seed), fit, 5, args.train_shots)
        results[str(frac)] = {}
        for variant, grid in (("plain", [(lam, 0.0, i) for lam in args.lams for i in args.interps]),
                              ("robust", [(lam, d, i) for lam in args.lams for d in args.deltas
                                          for i in args.interps])):
            if variant not in args.variants:
                continue
            best = None
            for lam, delta, interp in grid:
                ln = train(variant, lam, delta, interp, train_s, args)
                acc, _ = evaluate(ln, val_s, args.val_episodes, args, seed=1000)
                table.append({"blank": frac, "variant": variant, "lam": lam, "delta": delta, "interp": interp,
                              "val_acc": acc})
                print(f"blank {frac:g} {variant} λ={lam:g} δ={delta:g} ηλ={interp:g}: val {100 * acc:.2f} "
                      f"[{time.time() - t0:.0f}s]", flush=True)
                if best is None or acc > best[0]:
                    best = (acc, ln, lam, delta, interp)
            a, c = evaluate(best[1], test_s, args.test_episodes, args, seed=2000)
            results[str(frac)][variant] = {"lam": best[2], "delta": best[3] or None, "interp": best[4], "acc": a,
                                           "ci95": c}
            print(f"TEST blank {frac:g} {variant} (λ={best[2]:g}, δ={best[3]:g}, ηλ={best[4]:g}): "
                  f"{100 * a:.2f} ± {100 * c:.2f} [{time.time() - t0:.0f}s]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "validation": table, "test": results,
                                              "episodes": args.test_episodes, "seconds": time.time() - t0},
                                             indent=1))


if __name__ == "__main__":
    main()
