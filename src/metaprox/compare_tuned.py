"""The tuned half of ``metaprox compare``: every algorithm gets the same tuning budget, then its best
configuration is retrained at the full budget with several seeds and evaluated once on the test tasks.

A compare config's ``[tune]`` table holds the budget shared by all algorithms and one search space per algorithm::

    [tune]
    trials = 12            # the same number of finished trials for every algorithm
    steps = 500            # outer.steps of each trial (the full budget is shared.outer.steps)
    eval_every = 50        # periodic validation of a trial (what the pruner watches)
    seed = 0               # the same sampler seed for every algorithm
    seeds = [0, 1, 2]      # retraining seeds of each best configuration (≥ 3)
    [tune.space.mmp]
    prox.lam = { log = [0.05, 20.0] }
    [tune.space.maml]
    inner.lr = { log = [0.001, 0.1] }

(``set``, ``step``, ``sampler``, ``pruner``, ``prune_startup`` as in :mod:`metaprox.tune`.) The search spaces may not
touch the shared budget or protocol (:data:`metaprox.compare.SHARED_ONLY`). Every trial uses the same validation
tasks (``eval.val_seed``); test tasks are built only by the final evaluation of the retrained runs.

Verdict: the per-task test loss of an algorithm is averaged over its seeds; the 95% CI of a difference between two
algorithms is paired over the (same) test tasks. A difference counts as resolved only when that CI excludes 0 *and*
every seed of the better algorithm beats every seed of the other (seed spread is not in a task CI).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from metaprox.config import ConfigError
from metaprox.tune import PROTOCOL_KEYS, TUNE_DEFAULTS, resolve_tune

__all__ = ["resolve_compare_tune", "run_tuned", "test_losses", "verdicts"]


def resolve_compare_tune(raw: Mapping[str, Any] | None, runs: Mapping[str, dict[str, Any]],
                         shared_only: tuple[str, ...]) -> dict[str, Any] | None:
    """Validate a compare config's ``[tune]`` table against each algorithm's resolved run config.

    Returns ``{"seeds": [...], "algorithms": {label: resolved tune table}}``, or None when there is no table or it
    is ``false`` (``--set tune=false``: the untuned comparison only).
    """
    if raw is None or raw is False:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("[tune] must be a table (trials, steps, seeds, [tune.space.ALGORITHM], ...).")
    raw = copy.deepcopy(dict(raw))
    seeds = raw.pop("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or len(seeds) < 3 or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"tune.seeds = {seeds!r}: at least 3 distinct integer seeds (the retraining of each best "
                          f"configuration; seed spread is part of the verdict).")
    spaces = raw.pop("space", {})
    if not isinstance(spaces, Mapping):
        raise ConfigError("[tune.space] of a compare config holds one table per algorithm: [tune.space.mmp], ...")
    from metaprox.algorithms import ALGORITHMS

    extra = sorted(set(spaces) - set(runs) - set(ALGORITHMS))  # spaces of unselected known rules are ignored
    if extra:
        raise ConfigError(f"[tune.space.{extra[0]}]: {extra[0]!r} is neither in `algorithms` {list(runs)} nor a "
                          f"known rule; fix its name.")
    spaces = {label: space for label, space in spaces.items() if label in runs}
    missing = [label for label in runs if not spaces.get(label)]
    if missing:
        raise ConfigError(f"[tune.space.{missing[0]}] is missing or empty: every algorithm needs a search space so "
                          f"that each gets the same tuning budget.")
    unknown = sorted(set(raw) - set(TUNE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown [tune] key(s) {unknown}; valid: {sorted({*TUNE_DEFAULTS, 'seeds'})}.")
    forbidden = tuple(dict.fromkeys((*PROTOCOL_KEYS, *shared_only)))
    algos = {}
    for label, run in runs.items():
        try:
            algos[label] = resolve_tune({**raw, "space": spaces[label]}, run, forbidden)
        except ConfigError as e:
            raise ConfigError(f"algorithm {label!r}: {e}") from None
    return {"seeds": seeds, "algorithms": algos}


def test_losses(run_dir: Path) -> dict[str, Any]:
    """Per-task test loss (or accuracy) of a run at each of ``eval.steps``: the protocol of
    :func:`metaprox.evaluate.evaluate_run`, keeping the per-task values that paired comparisons need."""
    from metaprox.build import build_family, build_inner
    from metaprox.evaluate import adaptation_curve, evaluation_protocol, population_images
    from metaprox.rundir import load_learner

    learner, cfg, _ = load_learner(run_dir)
    e = cfg["eval"]
    steps = sorted(set(e["steps"]))
    inner = build_inner(cfg, lr=e["lr"], batch_size=e["batch_size"])
    metric = "loss" if learner.loss.name == "mse" else "accuracy"
    sets = {}
    family = build_family(cfg)
    with evaluation_protocol(learner, e, population_images(e, family)):
        for name, tasks in family.eval_sets("test").items():
            curve = adaptation_curve(learner, tasks, max(steps), lam=e["lam"], inner=inner,
                                     record=None if metric == "loss" else steps)
            values = curve.loss if metric == "loss" else curve.accuracy
            sets[name] = {str(s): [float(v) for v in values[s]] for s in steps}  # type: ignore[index]
    return {"metric": metric, "steps": steps, "sets": sets}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Seeds → per set and step: mean ± 95% CI over tasks of the seed-averaged per-task values, the per-seed means."""
    from metaprox.evaluate import mean_ci

    out: dict[str, Any] = {}
    for name, steps in per_seed[0]["sets"].items():
        out[name] = {}
        for s in steps:
            runs = [r["sets"][name][s] for r in per_seed]
            per_task = [_mean(list(vals)) for vals in zip(*runs, strict=True)]
            m, ci = mean_ci(per_task)
            out[name][s] = {"mean": m, "ci95": ci, "seed_means": [_mean(r) for r in runs], "per_task": per_task,
                            "tasks": len(per_task)}
    return out


def verdicts(tuned: Mapping[str, Any], metric: str) -> list[dict[str, Any]]:
    """For each set and step: every algorithm against the best one (paired over tasks), resolved or not."""
    from metaprox.evaluate import mean_ci

    better = min if metric == "loss" else max
    first = next(iter(tuned.values()))["summary"]
    rows = []
    for name, steps in first.items():
        for s in steps:
            stats = {lab: a["summary"][name][s] for lab, a in tuned.items()}
            best = better(stats, key=lambda lab: stats[lab]["mean"])
            for lab, st in stats.items():
                if lab == best:
                    continue
                diff = [x - y for x, y in zip(st["per_task"], stats[best]["per_task"], strict=True)]
                m, ci = mean_ci(diff)
                seeds_apart = (min(st["seed_means"]) > max(stats[best]["seed_means"]) if metric == "loss" else
                               max(st["seed_means"]) < min(stats[best]["seed_means"]))
                rows.append({"set": name, "step": int(s), "best": best, "other": lab, "diff": m, "ci95": ci,
                             "ci_excludes_0": abs(m) > ci, "seeds_apart": seeds_apart,
                             "resolved": abs(m) > ci and seeds_apart})
    return rows


def run_tuned(cfg: dict[str, Any], out: Path, train: Callable[[dict[str, Any], Path], dict[str, Any]],
              say: Callable[[str], None]) -> dict[str, Any]:
    """Tune every algorithm with the same budget, retrain each best config with every seed, test once."""
    from metaprox.tune import run_study, trial_config
    from metaprox.tune_report import write_outputs

    spec = cfg["tune"]

    def log_as(label: str) -> Callable[[str], None]:  # one study's progress lines, indented and labelled
        return lambda m: say(f"      {label} {m}")
    studies = {}
    for i, (label, run) in enumerate(cfg["runs"].items()):  # first all tuning, then any test task is built
        t = spec["algorithms"][label]
        tdir = out / "tune" / label
        say(f"[tune {i + 1}/{len(cfg['runs'])}] {label}: {t['trials']} trials × {t['steps']} iterations in {tdir}")
        study = run_study(run, t, tdir, study_name=label, log=log_as(label))
        studies[label] = (study, write_outputs(study, run, t, tdir))
        if studies[label][1]["best"] is None:
            raise RuntimeError(f"tuning {label!r}: no trial completed (all pruned or failed); see {tdir}/trials.md.")
    tuned: dict[str, Any] = {}
    for label, run in cfg["runs"].items():
        study, summary = studies[label]
        best = trial_config(run, spec["algorithms"][label], summary["best"]["params"], steps=run["outer"]["steps"])
        seeds = []
        for seed in spec["seeds"]:
            seed_cfg = {**copy.deepcopy(best), "seed": seed, "name": f"{label}-tuned-seed{seed}"}
            run_dir = out / "runs" / f"{label}-tuned" / f"seed{seed}"
            say(f"[retrain] {label}: best configuration, seed {seed}, {best['outer']['steps']} iterations")
            stats = train(seed_cfg, run_dir)
            seeds.append({"seed": seed, "train": stats, "test": test_losses(run_dir)})
        tuned[label] = {"params": summary["best"]["params"], "tuning": {k: v for k, v in summary.items()
                                                                         if k != "command"},
                        "config": best, "seeds": [{k: v for k, v in s.items() if k != "test"} for s in seeds],
                        "metric": seeds[0]["test"]["metric"], "summary": summarise([s["test"] for s in seeds]),
                        "curve": _best_so_far_curve(study)}
    metric = next(iter(tuned.values()))["metric"]
    return {"seeds": spec["seeds"], "algorithms": tuned, "verdicts": verdicts(tuned, metric),
            "budget": {k: v for k, v in next(iter(spec["algorithms"].values())).items() if k not in ("dims", "space")}}


def _best_so_far_curve(study: Any) -> list[dict[str, Any]]:
    return [{"number": t.number, "state": t.state.name.lower(),
             "value": t.value if t.state.name == "COMPLETE" else None} for t in study.get_trials(deepcopy=False)]
