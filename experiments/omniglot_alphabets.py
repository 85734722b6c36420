"""Omniglot alphabets as groups: a hierarchical prior (tasks → alphabet centers → root) against a flat prior, on
5-way 1-shot episodes drawn *within one alphabet* — for new characters of seen alphabets and for unseen alphabets.

Setting (small, one CPU thread): images area-downsampled 28→14 and flattened (196 inputs); MLP 196→h→h→5 with
ReLU; inner SGD (momentum) on the prox problem; both learners see the same episodes (alphabet drawn uniformly,
then 5 of its training characters), the same number of outer steps and the same outer step rule (SGD with
ηλ, linearly decayed), so the only difference is the prior. The outer step ηλ is chosen from ``--interps`` on
validation for each prior, like λ: an untuned step can cripple one prior and not the other.

Splits (deterministic, ``--seed``): each *background* alphabet with ≥ 20 characters gives 50 % of its characters
to training, 25 % to validation (new characters of seen alphabets) and 25 % to test; smaller background
alphabets train only. The 20 *evaluation* alphabets are unseen: the first 10 (sorted by name) validate, the last
10 test. λ (flat) and λ_group (hierarchical) are chosen on the validation sets only (mean of the seen and unseen
validation accuracies), as is ηλ; test numbers are reported once for the chosen values, 95 % CIs over episodes.

Adaptation: flat — from w with λ. Hierarchical — a task of a seen alphabet from its alphabet center θ_g with λ;
of an unseen alphabet from the root w with the marginal pull λλ_g/(λ + λ_g) (the unknown center integrated out).

    python experiments/omniglot_alphabets.py --data ../shared/data/omniglot --out reports/beyond/omniglot_alphabets.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omniglot_mixed_way import downsample
from torch import nn

import metaprox
from metaprox.algorithms.hierarchical import HierarchicalMMP
from metaprox.data.labelled import LabelledImages
from metaprox.data.omniglot import load_omniglot_npz
from metaprox.tasks.grouped import GroupEpisodes
from metaprox.tasks.task import Task

WAYS = 5


def splits(data: LabelledImages, seed: int) -> dict[str, dict[str, list[int]]]:
    """{split: {alphabet: class ids}} for train / val_seen / test_seen / val_unseen / test_unseen."""
    rng = np.random.default_rng(seed)
    by_alpha: dict[tuple[str, str], list[int]] = {}
    for c in range(data.num_classes):
        by_alpha.setdefault((data.class_meta["split"][c], data.class_meta["alphabet"][c]), []).append(c)
    out: dict[str, dict[str, list[int]]] = {k: {} for k in ("train", "val_seen", "test_seen", "val_unseen",
                                                            "test_unseen")}
    unseen = sorted(a for s, a in by_alpha if s != "background")
    for (split, alpha), classes in sorted(by_alpha.items()):
        if split != "background":
            out["val_unseen" if unseen.index(alpha) < len(unseen) // 2 else "test_unseen"][alpha] = classes
            continue
        if len(classes) < 4 * WAYS:
            out["train"][alpha] = classes
            continue
        perm = [classes[i] for i in rng.permutation(len(classes))]
        q = len(perm) // 4
        out["train"][alpha], out["val_seen"][alpha], out["test_seen"][alpha] = perm[2 * q:], perm[:q], perm[q:2 * q]
    return out


class AlphabetEpisodes:
    """5-way episodes within one alphabet (:class:`metaprox.tasks.grouped.GroupEpisodes`), images flattened for
    the MLP."""

    def __init__(self, data: LabelledImages, groups: dict[str, list[int]], shots: int, queries: int):
        self.episodes = GroupEpisodes(data, groups, WAYS, shots, queries)
        self.names = self.episodes.names

    def sample(self, n: int, gen: torch.Generator) -> tuple[list[Task], list[str]]:
        batch = self.episodes.sample(n, gen)
        tasks = [Task(t.x.flatten(1), t.y, None if t.x_query is None else t.x_query.flatten(1), t.y_query)
                 for t in batch]
        return tasks, batch.groups


def make_model(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(196, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, WAYS))


def build(kind: str, lam: float, lam_group: float, interp: float, args) -> metaprox.MetaLearner:
    inner = metaprox.SGD(lr=args.inner_lr, steps=args.inner_steps, momentum=args.momentum)
    common = dict(inner=inner, total_steps=args.steps, seed=args.seed)  # outer optimizer: plain SGD
    model = make_model(args.hidden, args.seed)
    if kind == "flat":
        return metaprox.MetaMinibatchProx(model, "cross_entropy", lam=lam, outer_lr=interp / lam, **common)
    # root: η λ_g = interp; groups: one meta-batch holds ~1/M of a group's mass, so scale the step by M
    return HierarchicalMMP(model, "cross_entropy", lam=lam, lam_group=lam_group, outer_lr=interp / lam_group,
                           group_lr=interp * args.meta_batch / (lam + lam_group), **common)


def train(kind: str, lam: float, lam_group: float, interp: float, episodes: AlphabetEpisodes,
          args) -> metaprox.MetaLearner:
    ln = build(kind, lam, lam_group, interp, args)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        tasks, groups = episodes.sample(args.meta_batch, gen)
        if kind == "flat":
            ln.step(tasks, monitor=False)
        else:
            ln.step(tasks, where=groups, monitor=False)
    return ln


def evaluate(ln: metaprox.MetaLearner, kind: str, episodes: AlphabetEpisodes, n: int, args,
             seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    tasks, groups = episodes.sample(n, gen)
    accs = []
    for t, g in zip(tasks, groups):
        p = ln.adapt(t, steps=args.eval_steps) if kind == "flat" else ln.adapt(t, where=g, steps=args.eval_steps)
        accs.append(query_accuracy(ln, p, t))
    return metaprox.mean_ci(accs)


def query_accuracy(ln: metaprox.MetaLearner, params: dict[str, torch.Tensor], task: Task) -> float:
    """Share of ``task``'s query examples that the adapted ``params`` classify correctly."""
    with torch.no_grad():
        return float((ln.predict(params, task.x_query).argmax(1) == task.y_query).float().mean())


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The options shared by the small Omniglot MLP experiments (this one and omniglot_robust.py)."""
    ap.add_argument("--data", default="../shared/data/omniglot", help="folder with omniglot28.npz")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--meta-batch", type=int, default=5)
    ap.add_argument("--train-shots", type=int, default=5)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--inner-lr", type=float, default=0.3)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--eval-steps", type=int, default=None)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--interps", type=float, nargs="+", default=[0.5],
                    help="grid of outer steps ηλ (at each level, linearly decayed), chosen on validation")
    ap.add_argument("--val-episodes", type=int, default=300)
    ap.add_argument("--test-episodes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--lam-groups", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    ap.add_argument("--kinds", nargs="+", default=["flat", "hierarchical"], choices=["flat", "hierarchical"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = downsample(load_omniglot_npz(Path(args.data) / "omniglot28.npz"))
    sp = splits(data, args.seed)
    train_eps = AlphabetEpisodes(data, sp["train"], args.train_shots, 0)
    evals = {k: AlphabetEpisodes(data, sp[k], args.shots, args.queries) for k in sp if k != "train"}
    print({k: f"{len(v)} alphabets, {sum(map(len, v.values()))} characters" for k, v in sp.items()}, flush=True)

    def score(kind: str, lam: float, lam_group: float, interp: float) -> tuple[metaprox.MetaLearner, float, dict]:
        ln = train(kind, lam, lam_group, interp, train_eps, args)
        val = {k: evaluate(ln, kind, evals[k], args.val_episodes, args, seed=1000 + i)
               for i, k in enumerate(("val_seen", "val_unseen"))}
        mean = float(np.mean([a for a, _ in val.values()]))
        print(f"{kind} λ={lam:g} λ_g={lam_group:g} ηλ={interp:g}: "
              + ", ".join(f"{k} {100 * a:.2f}" for k, (a, _) in val.items()) + f" [{time.time() - t0:.0f}s]",
              flush=True)
        return ln, mean, {k: a for k, (a, _) in val.items()}

    val_table, chosen = [], {}
    for kind, grid in (("flat", [(lam, 0.0, i) for lam in args.lams for i in args.interps]),
                       ("hierarchical", [(lam, lg, i) for lam in args.lams for lg in args.lam_groups
                                         for i in args.interps])):
        if kind not in args.kinds:
            continue
        best = None
        for lam, lg, interp in grid:
            ln, mean, val = score(kind, lam, lg, interp)
            val_table.append({"kind": kind, "lam": lam, "lam_group": lg, "interp": interp, **val})
            if best is None or mean > best[1]:
                best = (ln, mean, lam, lg, interp)
        chosen[kind] = best
    test = {}
    for kind, (ln, _, lam, lg, interp) in chosen.items():
        test[kind] = {"lam": lam, "lam_group": lg if kind == "hierarchical" else None, "interp": interp}
        for i, k in enumerate(("test_seen", "test_unseen")):
            a, c = evaluate(ln, kind, evals[k], args.test_episodes, args, seed=2000 + i)
            test[kind][k] = {"acc": a, "ci95": c}
        print(f"TEST {kind} (λ={lam:g}, λ_g={lg:g}, ηλ={interp:g}): " + ", ".join(
            f"{k} {100 * test[kind][k]['acc']:.2f} ± {100 * test[kind][k]['ci95']:.2f}"
            for k in ("test_seen", "test_unseen")) + f" [{time.time() - t0:.0f}s]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "validation": val_table, "test": test,
                                              "episodes": args.test_episodes, "seconds": time.time() - t0},
                                             indent=1))


if __name__ == "__main__":
    main()
