"""The one training loop (:func:`metaprox.train.train`) gives a finite task set what it gives a task stream:
periodic validation that leaves training unchanged, the ``outer.minutes`` budget, a session budget
(``max_seconds``) after which ``--resume`` equals an uninterrupted run, the NaN/inf guard (exit 3, the last
finite checkpoint kept) — on a 5-task table, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.checkpoint import load_checkpoint
from metaprox.cli import main
from metaprox.config import ConfigError, load_config
from metaprox.rundir import read_metrics
from metaprox.train import VAL_CURVE, train
from test_finite_table import SIZES, state, write_config, write_table


def finite_cfg(tmp_path: Path, **over: str) -> dict:
    table = tmp_path / "t.csv"
    if not table.exists():
        write_table(table)
    return load_config(write_config(tmp_path / "c.toml", table, **over))


def test_finite_validation_is_logged_and_leaves_training_unchanged(tmp_path):
    plain = train(finite_cfg(tmp_path), tmp_path / "plain")
    validated = train(finite_cfg(tmp_path, **{"log.eval_every": "2"}), tmp_path / "validated")
    a, b = state(tmp_path / "plain"), state(tmp_path / "validated")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same RNG streams, same steps
    assert validated["val"] == plain["val"]
    rows = read_metrics(tmp_path / "validated", VAL_CURVE)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert [r["tasks_seen"] for r in rows] == [0, 4, 8, 12]  # outer.meta_batch = 2
    # the last validation is the final evaluation of the validation rows (eval-val.json), number for number
    final = json.loads((tmp_path / "validated" / "eval-val.json").read_text())
    assert rows[-1]["val"] == final["val"] and rows[-1]["pooled"] == final["eval"]["pooled"]
    assert rows[-1]["J"] == final["J"]
    assert rows[0]["val"]["value"] > rows[-1]["val"]["value"]  # training lowers the validation RMSE
    assert not (tmp_path / "plain" / VAL_CURVE).exists()


def test_finite_validation_needs_validation_rows(tmp_path):
    cfg = finite_cfg(tmp_path, **{"log.eval_every": "2", "task.val_frac": "0.0"})
    with pytest.raises(ConfigError, match="log.eval_every = 2: .* no validation rows"):
        train(cfg, tmp_path / "run")


def test_finite_run_ends_on_its_minutes_budget_and_is_evaluated(tmp_path):
    """outer.steps = 10⁶ would take hours; 6 ms of meta-training end the run, which is then evaluated."""
    cfg = finite_cfg(tmp_path, **{"outer.steps": "1000000", "outer.minutes": "0.0001"})
    result = train(cfg, tmp_path / "run")
    ckpt = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert ckpt["step"] == result["step"] < 1_000_000
    assert json.loads((tmp_path / "run" / "eval-val.json").read_text())["val"] == result["val"]
    assert all(r["step"] <= result["step"] for r in read_metrics(tmp_path / "run"))


def test_finite_session_budget_then_resume_equals_uninterrupted(tmp_path):
    cfg = finite_cfg(tmp_path)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", max_seconds=0.0) == {}  # out of time before the first step
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 0
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["val"] == whole["val"] and resumed["J"] == whole["J"]
    a, b = state(tmp_path / "whole"), state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [r["step"] for r in read_metrics(tmp_path / "whole")]


def test_finite_run_stops_at_non_finite_parameters_keeping_the_last_finite_checkpoint(tmp_path, poison_outer_step,
                                                                                      capsys):
    """The center turned NaN by the outer step of step 3 (FiniteMMP steps through MetaLearner.apply_meta_gradient
    too): exit 3 naming the step and parameter; the kept checkpoint is step 2's, its center and rows finite."""
    poison_outer_step(3, 0)
    write_table(tmp_path / "t.csv")
    cfg = write_config(tmp_path / "c.toml", tmp_path / "t.csv", **{"log.checkpoint_every": "1", "log.every": "1"})
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("metaprox: error: training stopped at step 2: parameter 'weight' (nan)"), err
    assert "after outer step 3" in err and "last good checkpoint (step 2" in err, err
    saved, _ = load_checkpoint(tmp_path / "run")
    assert saved["step"] == 2 and all(bool(torch.isfinite(t).all()) for t in saved["params"].values())
    rows = state(tmp_path / "run")["rows"]
    assert rows.shape[0] == len(SIZES) and bool(torch.isfinite(rows).all())
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "eval-val.json").exists()
