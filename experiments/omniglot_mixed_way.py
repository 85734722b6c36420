"""One meta-batch mixing 5-, 10- and 20-way Omniglot tasks: private heads of different sizes around a
prox-shared MLP trunk (:class:`~metaprox.MultiHeadMMP`), vs the same trunk meta-trained on one way-count only.

Setting (small, for one CPU thread): images area-downsampled 28→14 and flattened (196 inputs); trunk
196→``hidden``→``hidden`` ReLU; heads Linear(hidden, N) per way-count N, started at zero in every task (labels
are permuted per episode, so a head start carries nothing) and private (λ = 0). The trunk is pulled toward the
center w with λ; outer optimizer Adam on the envelope gradient λ(w − trunk_t). Training classes: Omniglot
*background* characters (964, no rotations); test: the *evaluation* characters (659) — disjoint.

Variants (same trunk, same inner solver, same number of outer steps and of tasks per meta-batch):
``mixed`` (each meta-batch = ``--per-way`` tasks of each of 5/10/20-way), ``5way``, ``10way``, ``20way`` (all
tasks of one way-count, its one head), and ``untrained`` (the random initial trunk, no meta-training).
Evaluation: for each way-count, ``--eval-episodes`` test episodes (``--shots``-shot, ``--queries`` queries per
class), adapted from the trained center (trunk pulled with λ, zero head), query accuracy; 95 % CI over episodes.
Step sizes are fixed (below, not tuned on test classes). With more than one ``--lams`` value, *every* trained
variant picks its own λ on held-out *background* classes (trained on the first 80 % of background classes,
validated on the last 20 % with ``--val-episodes`` episodes per way-count, mean accuracy over 5/10/20-way), then
is retrained with that λ on all background classes — so no variant gets a tuned λ the others lack.

    python experiments/omniglot_mixed_way.py --data ../shared/data/omniglot --out reports/beyond/omniglot_mixed_way.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import metaprox
from metaprox.algorithms.multihead import MultiHeadMMP
from metaprox.data.labelled import LabelledImages
from metaprox.data.omniglot import load_omniglot_npz
from metaprox.models.shared_trunk import SharedTrunk
from metaprox.tasks.episodes import EpisodeSampler
from metaprox.tasks.task import Task

WAYS = (5, 10, 20)


def downsample(data: LabelledImages) -> LabelledImages:
    img = data.images.astype(np.float32)
    small = img.reshape(len(img), 14, 2, 14, 2).mean((2, 4))
    return LabelledImages(np.round(small).astype(np.uint8), data.labels, data.class_names, data.class_meta, "omni14")


def flat_tasks(sampler: EpisodeSampler, n: int, gen: torch.Generator) -> list[Task]:
    b = sampler.sample_batch(n, gen)
    if b.x_query.shape[1]:
        return [Task(b.x[t].flatten(1), b.y[t], b.x_query[t].flatten(1), b.y_query[t]) for t in range(n)]
    return [Task(b.x[t].flatten(1), b.y[t]) for t in range(n)]


def make_model(hidden: int, seed: int) -> SharedTrunk:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(196, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    return SharedTrunk(trunk, {f"{w}way": nn.Linear(hidden, w) for w in WAYS})


def learner(model: SharedTrunk, lam: float, args) -> MultiHeadMMP:
    return MultiHeadMMP(model, "cross_entropy", lam=lam, head_init="zero",
                        inner=metaprox.SGD(lr=args.inner_lr, steps=args.inner_steps, momentum=args.momentum),
                        meta_optimizer=lambda p: torch.optim.Adam(p, lr=args.outer_lr), seed=args.seed)


def train(variant: str, lam: float, data: LabelledImages, classes: list[int], args) -> MultiHeadMMP:
    ln = learner(make_model(args.hidden, args.seed), lam, args)
    samplers = {w: EpisodeSampler(data, classes, w, args.shots) for w in WAYS}
    ways = list(WAYS) if variant == "mixed" else [int(variant.removesuffix("way"))]
    per = args.per_way * len(WAYS) // len(ways)  # same number of tasks per meta-batch for every variant
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        tasks, kinds = [], []
        for w in ways:
            tasks += flat_tasks(samplers[w], per, gen)
            kinds += [f"{w}way"] * per
        ln.step(tasks, where=kinds, monitor=False)
    return ln


def evaluate(ln: MultiHeadMMP, data: LabelledImages, classes: list[int], episodes: int, args,
             seed: int) -> dict[int, tuple[float, float]]:
    out = {}
    for w in WAYS:
        sampler = EpisodeSampler(data, classes, w, args.shots, args.queries)
        gen = torch.Generator().manual_seed(seed + w)
        accs = []
        for t in flat_tasks(sampler, episodes, gen):
            p = ln.adapt(t, where=f"{w}way", steps=args.eval_steps)
            pred = ln.predict(p, t.x_query, f"{w}way").argmax(1)
            accs.append(float((pred == t.y_query).float().mean()))
        out[w] = metaprox.mean_ci(accs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["mixed", "5way", "10way", "20way", "untrained"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--per-way", type=int, default=2)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.5])
    ap.add_argument("--inner-lr", type=float, default=0.3)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--eval-steps", type=int, default=None)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--outer-lr", type=float, default=1e-3)
    ap.add_argument("--eval-episodes", type=int, default=400)
    ap.add_argument("--val-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=str, default="../shared/data/omniglot",
                    help="folder with omniglot28.npz (the shared compact copy)")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = downsample(load_omniglot_npz(str(Path(args.data) / "omniglot28.npz")))
    background = data.classes_where("split", "background")
    test = data.classes_where("split", "evaluation")
    cut = int(0.8 * len(background))
    fit, val = background[:cut], background[cut:]
    val_lams: dict[str, dict[float, float]] = {}
    chosen: dict[str, float] = {}
    results = {}
    for variant in args.variants:
        lam = args.lams[0]
        if variant != "untrained" and len(args.lams) > 1:  # λ on held-out background classes only
            val_lams[variant] = {}
            for cand in args.lams:
                r = evaluate(train(variant, cand, data, fit, args), data, val, args.val_episodes, args, seed=10_000)
                val_lams[variant][cand] = float(np.mean([r[w][0] for w in WAYS]))
                print(f"{variant} val λ={cand:g}: {val_lams[variant][cand]:.4f} [{time.time() - t0:.0f}s]", flush=True)
            lam = max(val_lams[variant], key=val_lams[variant].get)
        chosen[variant] = lam
        if variant == "untrained":
            ln = learner(make_model(args.hidden, args.seed), lam, args)
        else:
            ln = train(variant, lam, data, background, args)
        r = evaluate(ln, data, test, args.eval_episodes, args, seed=20_000)
        results[variant] = {f"{w}way": {"acc": a, "ci95": c} for w, (a, c) in r.items()}
        accs = "  ".join(f"{w}-way {100 * a:.2f} ± {100 * c:.2f}" for w, (a, c) in r.items())
        print(f"{variant:10s} λ={lam:g} {accs} [{time.time() - t0:.0f}s]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "lam": chosen, "val_lams": val_lams,
                                              "test_accuracy": results, "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
