"""The one training loop (:func:`metaprox.train.train`) gives a finite task set what it gives a task stream:
periodic validation that leaves training unchanged, the ``outer.minutes`` budget, a session budget
(``max_seconds``) after which ``--resume`` equals an uninterrupted run — on a 5-task table, seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.config import ConfigError, load_config
from metaprox.rundir import read_metrics
from metaprox.train import VAL_CURVE, train
from test_finite_table import state, write_config, write_table


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
