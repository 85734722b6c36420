"""``metaprox train`` with algorithm = "finite_mmp" on a multi-task fixture: a closed-form ground truth, the
interrupted-and-resumed run equal to an uninterrupted one, config errors, 2 torchrun ranks = 1 process, and
failures under torchrun: a killed rank fails the job fast, ``--resume`` (or an elastic restart with
``--auto-resume``) then equals an uninterrupted run, center and every per-task row of the store shards."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _torchrun_helpers import checkpoint_step, finish, kill_rank_after, torchrun_train
from conftest import stored_checkpoint
from metaprox import sharded
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.train import train

TASKS, PROFILES, D = 9, 20, 3


def write_survey(folder: Path) -> None:
    """computer_survey layout: const column + D attributes, per-task linear targets around a shared w."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=D)
    xs, ys, task, prof = [], [], [], []
    for t in range(TASKS):
        w = w0 + 0.5 * rng.normal(size=D)
        x = rng.choice([-1.0, 1.0], size=(PROFILES, D))
        xs.append(np.hstack([np.ones((PROFILES, 1)), x]))
        ys.append(x @ w + 0.3 * t + 0.2 * rng.normal(size=PROFILES))
        task += [t] * PROFILES
        prof += list(range(1, PROFILES + 1))
    np.savez(folder / "computer_survey.npz", X=np.vstack(xs), y=np.concatenate(ys), task=np.array(task),
             profile=np.array(prof), feature_names=np.array(["const"] + [f"a{i}" for i in range(D)]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("multitask")
    write_survey(d)
    return d


def overrides(data_dir: Path, **extra: object) -> list[str]:
    sets = {"name": "finite-test", "algorithm": "finite_mmp", "task.family": "multitask",
            "task.dataset": "computer_survey", "task.data_path": str(data_dir), "model.kind": "linear",
            "prox.lam": 2.0, "inner.solver": "sgd", "inner.lr": 0.1, "inner.steps": 10, "outer.lr": 0.2,
            "outer.steps": 12, "outer.meta_batch": 4, "outer.schedule": "constant", "log.every": 3,
            "log.checkpoint_every": 4, "log.progress": False, "log.tensorboard": "false", **extra}
    return [f"{k}={toml_value(v)}" for k, v in sets.items()]


def toml_value(v: object) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def cfg_of(data_dir: Path, **extra: object) -> dict:
    return resolve(apply_overrides({}, overrides(data_dir, **extra)))


def test_independent_limit_is_per_task_least_squares(data_dir, tmp_path):
    """λ → 0 with the exact inner solver: every v_t is its task's least-squares fit on profiles 1–16."""
    cfg = cfg_of(data_dir, **{"prox.lam": 1e-10, "inner.solver": "exact_least_squares", "finite.sample": "all",
                              "outer.steps": 1, "log.every": 1, "log.checkpoint_every": 1})
    res = train(cfg, tmp_path / "run")
    f = np.load(data_dir / "computer_survey.npz")
    x, y, task, prof = f["X"][:, 1:], f["y"], f["task"], f["profile"]
    train_rows = prof <= 16
    mean, std = x[train_rows].mean(0), x[train_rows].std(0) + 1e-12
    xs = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    err = []
    for t in range(TASKS):
        tr, te = (task == t) & train_rows, (task == t) & ~train_rows
        coef = np.linalg.lstsq(xs[tr], y[tr], rcond=None)[0]
        err.append(xs[te] @ coef - y[te])
    rmse = float(np.sqrt(np.mean(np.concatenate(err) ** 2)))
    assert res["test"]["metric"] == "rmse" and res["test"]["value"] == pytest.approx(rmse, rel=1e-6)
    assert res["test"]["rows"] == TASKS * 4
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["test"]["value"] == res["test"]["value"] and "RMSE" in (tmp_path / "run" / "eval.md").read_text()


def _state(run: Path, world: int = 1) -> dict[str, torch.Tensor]:
    """The center of the last checkpoint and every row (and initialised flag) of every store shard."""
    return stored_checkpoint(run, {f"rank{r}": sharded.shard_path(run, r, world) for r in range(world)})


def test_resume_equals_uninterrupted_and_metrics(data_dir, tmp_path):
    cfg = cfg_of(data_dir)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_at=5) == {}  # stopped: checkpoint at step 5 (and at 4)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, tmp_path / "cut")
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["test"]["value"] == whole["test"]["value"] and resumed["J"] == whole["J"]
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert rows[-1]["J"] < rows[0]["J"]  # the joint objective goes down
    changed = cfg_of(data_dir, **{"prox.lam": 3.0})
    with pytest.raises(ConfigError, match="prox.lam"):
        train(changed, tmp_path / "cut", resume=True)


def test_crash_right_after_a_commit_loses_no_metrics(data_dir, tmp_path, monkeypatch):
    """A death just after the checkpoint of step 8 is committed (before anything else is written): the resumed
    run's metrics log still holds the row of step 6, logged between the checkpoints of steps 4 and 8."""
    cfg = cfg_of(data_dir)
    train(cfg, tmp_path / "whole")
    save = sharded.save

    def save_then_die(root, learner, *args):
        save(root, learner, *args)
        if learner.step_count == 8:
            raise KeyboardInterrupt("killed right after the commit")

    monkeypatch.setattr(sharded, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut")
    monkeypatch.undo()
    train(cfg, tmp_path / "cut", resume=True)
    rows = [json.loads(r)["step"] for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [3, 6, 9, 12]
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors(data_dir):
    with pytest.raises(ConfigError, match="go together"):
        cfg_of(data_dir, **{"task.family": "sine"})
    with pytest.raises(ConfigError, match="finite.sample"):
        cfg_of(data_dir, **{"finite.sample": "sometimes"})
    ok = cfg_of(data_dir, **{"prox.lam": {"weight": 1.0, "bias": "private"}})
    assert ok["prox"]["lam"]["bias"] == "private"
    with pytest.raises(ConfigError, match="λ must be"):
        resolve(apply_overrides({}, ['prox.lam={weight = "private"}']))  # strings only for finite_mmp


def torchrun_finite(data_dir: Path, out: Path, *args: str, restarts: int = 0, **extra: object) -> subprocess.Popen:
    """2 torchrun ranks of ``metaprox train`` with the config of ``cfg_of(data_dir, **extra)``."""
    base = out.parent / "base.json"  # everything else from the same overrides as cfg_of
    base.write_text("{}")
    sets = [a for o in overrides(data_dir, **extra) for a in ("--set", o)]
    return torchrun_train(base, out, "--quiet", *sets, *args, restarts=restarts)


distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@distributed
@pytest.mark.parametrize("center_update", ["gradient", "exact", "solve"])
def test_two_torchrun_ranks_equal_one_process(data_dir, tmp_path, center_update):
    extra = {"finite.center_update": center_update}
    one = train(cfg_of(data_dir, **extra), tmp_path / "one")
    rc, log = finish(torchrun_finite(data_dir, tmp_path / "two", **extra), timeout=120)
    assert rc == 0, log[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["test"]["value"] == pytest.approx(one["test"]["value"], rel=1e-9)
    assert two["J"] == pytest.approx(one["J"], rel=1e-9)
    for r in range(2):
        assert (tmp_path / "two" / f"store-rank{r}-of-2" / "index.json").is_file()


@distributed
def test_minutes_budget_under_torchrun_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    """outer.minutes on 2 ranks: both stop and checkpoint at the same step (their shards committed together) and
    the run is evaluated. (The ranks agree on the clock; whether they would drift apart without that depends on
    timing that this run does not force, so this is the end-to-end check of the budgeted stop under torchrun.)"""
    run = tmp_path / "budget"
    rc, log = finish(torchrun_finite(data_dir, run, **{"outer.steps": 1_000_000, "outer.minutes": 0.005}),
                     timeout=120)
    assert rc == 0, log[-3000:]
    stopped = checkpoint_step(run)
    assert 0 < stopped < 1_000_000
    _state(run, world=2)  # both shards committed at the checkpoint's step, no commit left pending
    assert json.loads((run / "eval.json").read_text())["step"] == stopped


# ----- failures under torchrun: a few seconds of work, a checkpoint every 5 steps, rank 1 killed at ≥ KILL_AT ---
LONG = {"outer.steps": 300, "log.every": 5, "log.checkpoint_every": 5}
KILL_AT = 40


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    """The reference: an uninterrupted 2-rank run of LONG."""
    out = tmp_path_factory.mktemp("finite-dist") / "uninterrupted"
    rc, log = finish(torchrun_finite(data_dir, out, **LONG))
    assert rc == 0, log[-3000:]
    return out


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(r).items() if k != "time"}
            for r in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path) -> None:
    """Same world size: bitwise the same center, per-task rows, metrics log and evaluation."""
    a, b = _state(ref, world=2), _state(run, world=2)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _metrics(run) == _metrics(ref)
    assert json.loads((run / "eval.json").read_text()) == json.loads((ref / "eval.json").read_text())


@distributed
def test_killed_rank_fails_fast_and_resume_matches(data_dir, uninterrupted, tmp_path):
    run = tmp_path / "killed"
    proc = torchrun_finite(data_dir, run, **LONG)
    kill_rank_after(proc, run, rank=1, step=KILL_AT)
    t_kill = time.monotonic()
    rc, log = finish(proc, timeout=40)
    assert rc != 0
    assert time.monotonic() - t_kill < 30, "the job did not fail fast"
    stopped = checkpoint_step(run)
    assert KILL_AT <= stopped < LONG["outer.steps"] and not (run / "eval.json").exists()
    rc, log = finish(torchrun_finite(data_dir, run, "--resume", **LONG))
    assert rc == 0, log[-3000:]
    assert_same_run(run, uninterrupted)


@distributed
def test_elastic_restart_resumes_automatically(data_dir, uninterrupted, tmp_path):
    run = tmp_path / "elastic"
    proc = torchrun_finite(data_dir, run, "--auto-resume", restarts=1, **LONG)
    kill_rank_after(proc, run, rank=1, step=KILL_AT)
    rc, log = finish(proc)
    assert rc == 0, log[-3000:]
    assert_same_run(run, uninterrupted)
