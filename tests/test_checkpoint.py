"""Checkpoints: bitwise resume, atomic writes, clear errors for damaged files."""

import json

import pytest
import torch

from metaprox.checkpoint import CheckpointError, atomic_write, load_checkpoint
from metaprox.config import resolve
from metaprox.rundir import read_metrics
from metaprox.train import TrainingDiverged, train


def _cfg(**outer):
    return resolve({"outer": {"steps": 40, "meta_batch": 3, **outer}, "task": {"train_points": 10},
                    "inner": {"steps": 3, "batch_size": 5},
                    "log": {"every": 5, "checkpoint_every": 10, "tensorboard": "false", "progress": False},
                    "eval": {"tasks": 4, "steps": [0, 1], "shots": [5]}})


def _params(run_dir):
    state, _ = load_checkpoint(run_dir)
    return state["params"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, optimizer):
    cfg = _cfg(optimizer=optimizer, lr=0.1)
    train(cfg, tmp_path / "full", evaluate=False)
    train(cfg, tmp_path / "split", evaluate=False, stop_at=20)
    assert load_checkpoint(tmp_path / "split")[0]["step"] == 20
    train(cfg, tmp_path / "split", resume=True, evaluate=False)
    a, b = _params(tmp_path / "full"), _params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [r["step"] for r in read_metrics(tmp_path / "full")]


def test_crash_right_after_a_commit_loses_no_metrics(tmp_path, monkeypatch):
    """A death just after the checkpoint of step 20 is committed: the resumed run's metrics log still holds the
    row of step 15, logged between the checkpoints of steps 10 and 20 (and the validation rows likewise)."""
    import metaprox.train as train_module

    cfg = _cfg()
    cfg["log"]["eval_every"], cfg["log"]["eval_tasks"] = 5, 2
    train(cfg, tmp_path / "full", evaluate=False)
    save = train_module.save_checkpoint

    def save_then_die(run_dir, state, extra):
        save(run_dir, state, extra)
        if state["step"] == 20:
            raise KeyboardInterrupt("killed right after the commit")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "split", evaluate=False)
    monkeypatch.undo()
    train(cfg, tmp_path / "split", resume=True, evaluate=False)
    for name in ("metrics.jsonl", "val_curve.jsonl"):
        steps = [r["step"] for r in read_metrics(tmp_path / "split", name)]
        assert steps == [r["step"] for r in read_metrics(tmp_path / "full", name)], name


def test_refuses_to_overwrite_and_to_resume_with_another_config(tmp_path):
    cfg = _cfg()
    train(cfg, tmp_path / "r", evaluate=False, stop_at=10)
    with pytest.raises(Exception, match="already holds a run"):
        train(cfg, tmp_path / "r", evaluate=False)
    with pytest.raises(Exception, match="changed: outer.lr"):
        train(_cfg(lr=0.3), tmp_path / "r", resume=True, evaluate=False)


def test_truncated_and_corrupt_checkpoints_are_named(tmp_path):
    train(_cfg(), tmp_path / "r", evaluate=False, stop_at=10)
    meta = json.loads((tmp_path / "r" / "checkpoint.json").read_text())
    tensors = tmp_path / "r" / meta["tensors"]
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "r")
    tensors.write_bytes(blob)
    load_checkpoint(tmp_path / "r")
    (tmp_path / "r" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "r")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_nan_during_training_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from metaprox.build import SineTasks
    from metaprox.tasks.task import Task

    real = SineTasks.train_batch
    calls = {"n": 0}

    def poisoned(self, n, generator):
        calls["n"] += 1
        tasks = real(self, n, generator)
        if calls["n"] <= 15:
            return tasks
        return [Task(t.x, t.y * 1e30) for t in tasks]  # finite data whose loss overflows to inf

    monkeypatch.setattr(SineTasks, "train_batch", poisoned)
    with pytest.raises(TrainingDiverged, match="stopped at step 15.*last good checkpoint"):
        train(_cfg(), tmp_path / "r", evaluate=False)
    state, _ = load_checkpoint(tmp_path / "r")
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["params"].values())
    assert not list((tmp_path / "r").glob(".*.tmp"))
