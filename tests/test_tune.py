"""`metaprox tune`: closed-form optima are found, pruning spares the best, test tasks are never built, bad input
fails before any trial, studies resume and are shared by several worker processes, a killed worker's trial fails."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from metaprox.build import SineTasks  # noqa: E402
from metaprox.cli import main  # noqa: E402
from metaprox.config import ConfigError, load_config, resolve  # noqa: E402
from metaprox.rundir import load_learner  # noqa: E402
from metaprox.tune import open_storage, resolve_tune, run_study, tune_command  # noqa: E402
from metaprox.tune_report import write_outputs  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A linear model y = a·x + b on sine tasks with the exact (ridge) prox solve: validation loss after test-time
# adaptation has a closed form in the test-time λ (eval.lam), computed below independently of metaprox.
LINEAR = """
name = "lin"
algorithm = "mmp"
[task]
train_points = 10
[model]
sizes = [1, 1]
[prox]
lam = 1.0
[inner]
solver = "exact_least_squares"
[outer]
steps = 6
meta_batch = 5
lr = 0.5
[eval]
shots = [5]
tasks = 40
points = 50
steps = [1]
[log]
every = 3
eval_tasks = 10
[tune]
trials = 14
eval_every = 2
prune_startup = 3
[tune.space]
eval.lam = { log = [0.001, 100.0] }
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def ridge_val_loss(w: torch.Tensor, b: torch.Tensor, tasks, lam: float) -> float:
    """Mean query MSE after θ = argmin (1/n)‖Xθ − y‖² + λ/2‖θ − θ₀‖² (θ = [a, b]), per task, in float64."""
    theta0 = torch.cat([w.flatten(), b.flatten()]).double()
    losses = []
    for t in tasks:
        xa = torch.cat([t.x.double(), torch.ones(len(t.x), 1, dtype=torch.float64)], 1)
        n = len(t.x)
        a = (2.0 / n) * xa.T @ xa + lam * torch.eye(2, dtype=torch.float64)
        theta = torch.linalg.solve(a, (2.0 / n) * xa.T @ t.y.double().flatten() + lam * theta0)
        xq = torch.cat([t.x_query.double(), torch.ones(len(t.x_query), 1, dtype=torch.float64)], 1)
        losses.append(float(((xq @ theta - t.y_query.double().flatten()) ** 2).mean()))
    return sum(losses) / len(losses)


def test_finds_closed_form_optimum_and_never_builds_test_tasks(tmp_path, monkeypatch):
    built = []
    original = SineTasks.eval_sets

    def guarded(self, split):
        built.append(split)
        if split != "val":
            raise AssertionError(f"tuning built {split!r} tasks")
        return original(self, split)

    monkeypatch.setattr(SineTasks, "eval_sets", guarded)
    cfg_path = write(tmp_path, LINEAR)
    summary = tune_command(cfg_path, tmp_path / "out")
    assert built and set(built) == {"val"}

    study = optuna.load_study(study_name="lin", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trials = study.get_trials()
    assert len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) == 14
    # every complete trial trained the same prior (eval.lam is test-time only): read it from one, check all agree
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    learner, cfg, _ = load_learner(tmp_path / "out" / complete[0].user_attrs["run_dir"])
    w, b = (p.detach() for p in learner.center())
    for t in complete[1:]:
        other, _, _ = load_learner(tmp_path / "out" / t.user_attrs["run_dir"])
        assert all(torch.equal(p, q) for p, q in zip(learner.center(), other.center(), strict=True))
    val = original(SineTasks(cfg), "val")["5-shot"]
    truth = {t.number: ridge_val_loss(w, b, val, t.params["eval.lam"]) for t in trials}
    for t in trials:  # the objective is exactly the validation loss of the trained prior
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(truth[t.number], rel=1e-5)
    grid = [10 ** (-3 + 5 * i / 2000) for i in range(2001)]
    losses = [ridge_val_loss(w, b, val, lam) for lam in grid]
    lam_star = grid[min(range(len(grid)), key=losses.__getitem__)]
    assert 1e-3 < lam_star < 1e2, "the optimum must be inside the searched range for this test to mean anything"
    best = summary["best"]["params"]["eval.lam"]
    assert abs(math.log10(best) - math.log10(lam_star)) < 0.25, (best, lam_star)  # 14 trials: ±0.25 decade
    # pruning never stopped the trial that is best in closed form
    assert study.get_trials()[min(truth, key=truth.get)].state.name == "COMPLETE"
    assert any(t.state.name == "PRUNED" for t in trials), "the pruner should have stopped the poorest trials"
    # outputs: a ready-to-run config at the full budget with the chosen λ, the trials table, the figures
    out = tmp_path / "out"
    for name in ("best.toml", "trials.csv", "trials.md", "best_so_far.png", "importances.png", "summary.json"):
        assert (out / name).is_file(), name
    best_cfg = load_config(out / "best.toml")
    assert best_cfg["eval"]["lam"] == best and best_cfg["outer"]["steps"] == 6 and best_cfg["tune"] is None
    assert best_cfg["log"]["eval_every"] == 0  # the base config's logging, not the trials'
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + len(trials)


def quadratic_objective(trial, reports: int = 5) -> float:
    """f = (log10 λ − log10 0.3)² + (lr − 0.6)², reported as f + 1/step on a curve: the order of trials is the same
    at every step, so a median pruner must never stop the best one."""
    lam = trial.suggest_float("prox.lam", 1e-2, 1e2, log=True)
    lr = trial.suggest_float("outer.lr", 0.0, 2.0)
    f = (math.log10(lam) - math.log10(0.3)) ** 2 + (lr - 0.6) ** 2
    for step in range(1, reports + 1):
        trial.report(f + 1.0 / step, step)
        if step < reports and trial.should_prune():
            raise optuna.TrialPruned()
    return f


def sine_cfg(**tune):
    cfg = resolve({"outer": {"steps": 10}, "eval": {"shots": [5], "steps": [0, 1]}})
    return cfg, resolve_tune({"space": {"prox.lam": {"log": [1e-2, 1e2]}, "outer.lr": {"uniform": [0.0, 2.0]}},
                              **tune}, cfg)


def test_quadratic_study_finds_known_optimum_pruning_spares_best(tmp_path):
    cfg, tune = sine_cfg(trials=40, prune_startup=5)
    study = run_study(cfg, tune, tmp_path, objective=quadratic_objective)
    trials = study.get_trials()
    assert len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) == 40
    best = study.best_params
    assert abs(math.log10(best["prox.lam"]) - math.log10(0.3)) < 0.25 and abs(best["outer.lr"] - 0.6) < 0.25
    f = {t.number: (math.log10(t.params["prox.lam"]) - math.log10(0.3)) ** 2 + (t.params["outer.lr"] - 0.6) ** 2
         for t in trials}
    assert trials[min(f, key=f.get)].state.name == "COMPLETE"
    assert sum(t.state.name == "PRUNED" for t in trials) >= 5
    summary = write_outputs(study, cfg, tune, tmp_path)
    assert summary["best"]["number"] == min(f, key=f.get) and set(summary["importances"]) == {"prox.lam", "outer.lr"}


def test_running_again_continues_the_study(tmp_path):
    cfg, tune = sine_cfg(trials=3)
    run_study(cfg, tune, tmp_path, objective=quadratic_objective)
    tune["trials"] = 5
    study = run_study(cfg, tune, tmp_path, objective=quadratic_objective)
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3, 4]
    other, _ = sine_cfg(trials=5)
    other["inner"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="created for another config"):
        run_study(other, tune, tmp_path, objective=quadratic_objective)


@pytest.mark.parametrize("space, message", [
    ({"prox.lamb": {"log": [0.1, 1.0]}}, "'prox.lamb' is not a config key"),
    ({"inner": {"lrr": {"uniform": [0.1, 1.0]}}}, "'inner.lrr' is not a config key"),
    ({"outer.steps": {"int": [10, 100]}}, "budget or evaluation protocol"),
    ({"eval.seed": {"int": [1, 5]}}, "budget or evaluation protocol"),
    ({"inner.lr": {"uniform": [0.1, 0.1]}}, "empty range"),
    ({"inner.lr": {"uniform": [0.5, 0.1]}}, "empty range"),
    ({"prox.lam": {"log": [0.0, 1.0]}}, "log-uniform range needs low > 0"),
    ({"inner.steps": {"int": [1.5, 4]}}, "integer bounds"),
    ({"inner.solver": {"choice": [1, 2]}}, "'inner.solver' must be a string"),
    ({"inner.lr": {"choice": ["fast", "slow"]}}, "'inner.lr' must be a number"),
    ({"model.sizes": {"choice": [[1, 40, 1], [1, 80, 1]]}}, "distinct numbers, strings or booleans"),
    ({"inner.lr": {"normal": [0.1, 1.0]}}, "write one of"),
    ({"inner.lr": [0.1, 1.0]}, "write one of"),
    ({"outer.optimizer": {"choice": ["sgd", "lbfgs"]}}, "lbfgs"),
    ({}, "[tune.space] is empty"),
])
def test_bad_space_is_a_clear_error_before_any_trial(tmp_path, space, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"name": "x", "outer": {"steps": 4}, "tune": {"trials": 2, "space": space}}))
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    cfg = load_config(path)
    with pytest.raises(ConfigError) as e:
        resolve_tune(cfg["tune"], cfg)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing was created, no trial ran


@pytest.mark.parametrize("tune, message", [
    ({"trials": 0}, "tune.trials"), ({"sampler": "grid"}, "tune.sampler"), ({"typo": 1}, "unknown [tune] key"),
    ({"set": "7-shot"}, "tune.set"), ({"step": 3}, "tune.step"), ({"eval_every": 50}, "tune.eval_every"),
])
def test_bad_tune_table(tune, message):
    cfg = resolve({"outer": {"steps": 10}, "eval": {"shots": [5], "steps": [0, 1]}})
    with pytest.raises(ConfigError) as e:
        resolve_tune({"space": {"inner.lr": {"uniform": [0.01, 0.1]}}, **tune}, cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("url", ["sqlite:////nonexistent-dir/x/study.db", "journal:/nonexistent-dir/x/journal.log",
                                 "postgresql://u:p@127.0.0.1:1/db", "study.db"])
def test_unopenable_storage_fails_before_any_trial(tmp_path, url, capsys):
    with pytest.raises(ConfigError, match="cannot open the study storage"):
        open_storage(url)
    cfg_path = write(tmp_path, LINEAR)
    assert main(["tune", str(cfg_path), "--out", str(tmp_path / "out"), "--storage", url]) == 2
    assert "cannot open the study storage" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists()


def test_config_without_tune_table(tmp_path, capsys):
    path = write(tmp_path, 'name = "x"\n')
    assert main(["tune", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "no [tune] table" in capsys.readouterr().err


# ----- several processes ----------------------------------------------------------------------------------------
SLOW = LINEAR.replace("steps = 6\nmeta_batch = 5", "steps = 400\nmeta_batch = 5").replace(
    "eval_every = 2", "eval_every = 20").replace("trials = 14", "trials = 3")


def worker(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH",
                                                                                                       "")])}
    return subprocess.Popen([sys.executable, "-m", "metaprox.cli", "tune", str(cfg), "--out", str(out), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_share_a_journal_study(tmp_path):
    cfg = write(tmp_path, LINEAR.replace("trials = 14", "trials = 8"))
    out = tmp_path / "out"
    out.mkdir()
    storage = f"journal:{out / 'journal.log'}"
    procs = [worker(cfg, out, "--storage", storage) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="lin", storage=open_storage(storage))
    trials = study.get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 8 <= len(finished) <= 9 and len(finished) == len(trials)  # none lost; at most one extra from the race
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no duplicate
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{n:04d}" for n in numbers]  # one run each
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)
    assert {t.user_attrs["worker"].split(":")[1] for t in trials} <= {str(p.pid) for p in procs}


def test_killed_worker_trial_is_failed_and_study_continues(tmp_path):
    cfg = write(tmp_path, SLOW)
    out = tmp_path / "out"
    p = worker(cfg, out)
    study = None
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a trial has trained (a checkpoint exists), then kill the worker
        if any((out / "trials").glob("*/checkpoint.json")):
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("the worker did not start a trial within 120 s")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    study = optuna.load_study(study_name="lin", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.get_trials()][-1] == "RUNNING"
    rerun = worker(cfg, out, "--trials", "2")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert "its worker died; marked failed" in err
    trials = study.get_trials()
    killed = trials[0]
    assert killed.state.name == "FAIL" and "died" in killed.system_attrs["fail_reason"]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"]["fail"] == 1 and summary["best"]["number"] != killed.number
