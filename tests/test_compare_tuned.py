"""`metaprox compare` with [tune]: the same tuning budget per algorithm, test tasks only for the retrained runs,
verdicts from paired CIs and seed spread, the tuned report section; config errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from metaprox.build import SineTasks  # noqa: E402
from metaprox.compare import resolve_compare  # noqa: E402
from metaprox.compare_tuned import run_tuned, verdicts  # noqa: E402
from metaprox.compare_tuned_report import plot_tuning_curves, tuned_markdown  # noqa: E402
from metaprox.config import ConfigError  # noqa: E402
from metaprox.train import train  # noqa: E402

RAW = {
    "algorithms": ["mmp", "fomaml"],
    "shared": {"task": {"train_points": 10, "query_points": 10}, "inner": {"steps": 2},
               "outer": {"steps": 6, "meta_batch": 3},
               "eval": {"shots": [5], "tasks": 6, "points": 20, "steps": [0, 2]},
               "log": {"every": 3, "eval_every": 3, "eval_tasks": 2, "tensorboard": "false", "progress": False}},
    "per_algorithm": {"mmp": {"prox": {"lam": 0.5}}, "fomaml": {"prox": {"lam": 0}}},
    "bench": {"curve_step": 2},
    "tune": {"trials": 3, "steps": 4, "eval_every": 2, "seeds": [0, 1, 2],
             "space": {"mmp": {"prox.lam": {"log": [0.1, 10.0]}}, "fomaml": {"inner.lr": {"log": [0.001, 0.1]}}}},
}


def test_equal_budget_and_test_tasks_only_for_retrained_runs(tmp_path, monkeypatch):
    splits = []
    original = SineTasks.eval_sets

    def recording(self, split):
        splits.append((split, len(list((tmp_path / "tune" / "fomaml" / "trials").glob("*")))))
        return original(self, split)

    monkeypatch.setattr(SineTasks, "eval_sets", recording)
    cfg = resolve_compare(RAW)
    trained = []

    def in_process(run, run_dir: Path):
        trained.append(run)
        train(run, run_dir, progress=False, evaluate=False)
        return {"train_s": 0.0}

    tuned = run_tuned(cfg, tmp_path, in_process, lambda m: None)
    # tuning used validation tasks only; test tasks are built after every trial (the last study has its 3), once
    # per algorithm and seed
    first_test = [s for s, _ in splits].index("test")
    assert {s for s, _ in splits[:first_test]} == {"val"} and splits[first_test] == ("test", 3)
    assert [s for s, _ in splits].count("test") == 2 * 3
    # the same budget: finished trials, iterations per trial, validation tasks, sampler seed
    budgets = set()
    for label in ("mmp", "fomaml"):
        summary = json.loads((tmp_path / "tune" / label / "summary.json").read_text())
        done = summary["states"].get("complete", 0) + summary["states"].get("pruned", 0)
        trial_dirs = (tmp_path / "tune" / label / "trials").glob("*/config.json")
        runs = [json.loads(p.read_text())["config"] for p in trial_dirs]
        budgets.add((done, summary["trial_steps"], summary["seed"], summary["objective"]["val_seed"],
                     frozenset(r["outer"]["steps"] for r in runs), frozenset(r["log"]["eval_every"] for r in runs)))
    assert budgets == {(3, 4, 0, 7, frozenset({4}), frozenset({2}))}
    # the best configuration retrained at the full budget, once per seed
    assert [(r["name"], r["seed"], r["outer"]["steps"]) for r in trained] == [
        (f"{lab}-tuned-seed{s}", s, 6) for lab in ("mmp", "fomaml") for s in (0, 1, 2)]
    mmp = tuned["algorithms"]["mmp"]
    assert [r["prox"]["lam"] for r in trained[:3]] == [mmp["params"]["prox.lam"]] * 3
    cell = mmp["summary"]["5-shot"]["2"]
    assert len(cell["per_task"]) == 6 and len(cell["seed_means"]) == 3
    assert cell["mean"] == pytest.approx(sum(cell["seed_means"]) / 3)
    plot_tuning_curves({"tuned": tuned}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    md = "\n".join(tuned_markdown({"tuned": tuned, "algorithms": {}}))
    assert "| mmp | prox.lam: log-uniform in [0.1, 10] | prox.lam = " in md
    assert "| 5-shot | 2 |" in md and "tune/fomaml/trials.md" in md


def _alg(per_task_by_seed):
    from metaprox.compare_tuned import summarise

    return {"summary": summarise([{"sets": {"5-shot": {"1": seed}}} for seed in per_task_by_seed])}


def test_verdicts_need_ci_and_seed_separation():
    clear = {"a": _alg([[1.0, 1.1, 0.9, 1.0]] * 3), "b": _alg([[2.0, 2.1, 1.9, 2.0], [2.1, 2.0, 2.0, 1.9],
                                                                  [1.9, 2.2, 2.0, 2.0]])}
    (v,) = verdicts(clear, "loss")
    assert v["best"] == "a" and v["other"] == "b" and v["diff"] == pytest.approx(1.0, abs=0.05) and v["resolved"]
    # same per-task means, but one seed of b is better than one of a: not resolved although the task CI excludes 0
    overlap = {"a": _alg([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.6, 1.6, 1.6, 1.6]]),
               "b": _alg([[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.6, 1.6]])}
    (v,) = verdicts(overlap, "loss")
    assert v["ci_excludes_0"] and not v["seeds_apart"] and not v["resolved"]
    noisy = {"a": _alg([[1.0, 3.0, 1.0, 3.0]] * 3), "b": _alg([[3.0, 1.0, 3.1, 1.0]] * 3)}
    (v,) = verdicts(noisy, "loss")
    assert not v["ci_excludes_0"] and not v["resolved"]


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1]}, "at least 3 distinct"),
    ({"space": {"mmp": {"prox.lam": {"log": [0.1, 1.0]}}}}, "[tune.space.fomaml] is missing"),
    ({"space": {**RAW["tune"]["space"], "mamll": {"inner.lr": {"log": [0.01, 0.1]}}}}, "neither in `algorithms`"),
    ({"space": {**RAW["tune"]["space"], "fomaml": {"inner.steps": {"int": [1, 5]}}}}, "budget or evaluation"),
    ({"space": {**RAW["tune"]["space"], "fomaml": {"outer.meta_batch": {"int": [1, 5]}}}}, "budget or evaluation"),
    ({"space": {**RAW["tune"]["space"], "fomaml": {"inner.lrr": {"log": [0.01, 0.1]}}}},
     "algorithm 'fomaml': tune.space.inner.lrr"),
    ({"trails": 3}, "unknown [tune] key"),
])
def test_compare_tune_config_errors(change, message):
    assert resolve_compare({**RAW, "tune": False})["tune"] is None  # --set tune=false: untuned only
    raw = {**RAW, "tune": {**RAW["tune"], **change}}
    with pytest.raises(ConfigError) as e:
        resolve_compare(raw)
    assert message in str(e.value)


def test_shipped_compare_configs_resolve_with_equal_tuning_budgets():
    from metaprox.compare import load_compare_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("compare_sine.toml", "compare_omniglot.toml", "compare_omniglot_cpu.toml"):
        cfg = load_compare_config(root / name)
        budgets = {json.dumps({k: v for k, v in t.items() if k not in ("dims", "space")}, sort_keys=True)
                   for t in cfg["tune"]["algorithms"].values()}
        assert len(budgets) == 1 and set(cfg["tune"]["algorithms"]) == set(cfg["algorithms"]), name
        assert len(cfg["tune"]["seeds"]) >= 3
    # the CPU-sized Omniglot box of MMP lies inside ηλ < 2, so no sampled trial is refused as unstable
    mmp = load_compare_config(root / "compare_omniglot_cpu.toml")["tune"]["algorithms"]["mmp"]
    dims = {d.key: d for d in mmp["dims"]}
    assert dims["outer.lr"].high * dims["prox.lam"].high < 2
