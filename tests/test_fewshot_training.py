"""Config-driven few-shot training end to end on a tiny Omniglot-layout fixture (PNG folders): the background /
evaluation split, Conv-4, periodic validation accuracy (the time-to-accuracy curve), evaluation with CIs, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_omniglot import make_omniglot
from metaprox.config import apply_overrides, resolve
from metaprox.tasks.fewshot import load_split
from metaprox.train import train


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    make_omniglot(root)
    return root


def test_background_split_holds_out_the_last_alphabets(omniglot_root):
    def alphabets(which):
        images, classes = load_split("omniglot", omniglot_root, "background", which, val_alphabets=1)
        return sorted({images.class_meta["alphabet"][c] for c in classes})

    assert alphabets("train") == ["A1", "A2", "A3"]
    assert alphabets("val") == ["A4"]
    assert alphabets("test") == ["E1", "E2"]


def test_train_logs_validation_accuracy_and_evaluates(omniglot_root, tmp_path):
    torch.set_num_threads(1)
    sets = {"name": "tiny-omniglot", "task.family": "fewshot", "task.dataset": "omniglot",
            "task.data_path": str(omniglot_root), "task.split": "background", "task.val_alphabets": 1,
            "task.ways": 2, "task.shots": 1, "task.train_shots": 2, "task.eval_queries": 2,
            "model.kind": "conv4", "model.filters": 4, "model.bn": "transductive", "prox.lam": 1.0,
            "inner.solver": "adam", "inner.lr": 0.01, "inner.beta1": 0.0, "inner.steps": 2,
            "outer.lr": 1.0, "outer.steps": 6, "outer.meta_batch": 2, "eval.tasks": 8, "eval.steps": [0, 2],
            "log.every": 2, "log.eval_every": 3, "log.eval_tasks": 4, "log.checkpoint_every": 3}
    cfg = resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "val_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        acc = r["accuracy"]["2-way 1-shot"]
        assert set(acc) == {"0", "2"} and all(0.0 <= a <= 1.0 for a in acc.values())
        # 4 episodes × 2 classes × 2 queries: every mean is a multiple of 1/16
        assert all(abs(16 * a - round(16 * a)) < 1e-9 for a in acc.values())
        assert all(np.isfinite(v) for v in r["sets"]["2-way 1-shot"].values())
    row = result["sets"]["2-way 1-shot"]["2"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy_ci95"] > 0.0
    for plot in ("learning_curve.png", "val_curve.png", "adaptation.png"):
        assert (tmp_path / "run" / "plots" / plot).stat().st_size > 1000


def test_large_evaluations_are_adapted_part_by_part_with_the_same_result(omniglot_root, tmp_path, monkeypatch):
    """evaluate_run adapts EVAL_PART episodes at a time (memory): the parts are the episodes of one whole draw."""
    import metaprox.evaluate as evaluate

    torch.set_num_threads(1)
    sets = {"task.family": "fewshot", "task.dataset": "omniglot", "task.data_path": str(omniglot_root),
            "task.split": "background", "task.val_alphabets": 1, "task.ways": 2, "task.shots": 1,
            "task.train_shots": 2, "task.eval_queries": 2, "model.kind": "conv4", "model.filters": 4,
            "model.bn": "transductive", "prox.lam": 1.0, "inner.solver": "adam", "inner.lr": 0.01,
            "inner.steps": 2, "outer.steps": 2, "outer.meta_batch": 2, "eval.tasks": 7, "eval.steps": [0, 3]}
    cfg = resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))
    train(cfg, tmp_path / "run", progress=False, evaluate=False)
    whole = evaluate.evaluate_run(tmp_path / "run", write=False)
    monkeypatch.setattr(evaluate, "EVAL_PART", 3)  # parts of 3, 3 and 1 episodes
    calls = []
    real = evaluate.adaptation_curve
    monkeypatch.setattr(evaluate, "adaptation_curve", lambda ln, tasks, *a, **k: calls.append(len(tasks))
                        or real(ln, tasks, *a, **k))
    parts = evaluate.evaluate_run(tmp_path / "run", write=False)
    assert calls == [3, 3, 1]
    for name, row in whole["sets"].items():
        for step in ("0", "3"):
            assert parts["sets"][name][step]["tasks"] == 7
            assert parts["sets"][name][step]["accuracy"] == pytest.approx(row[step]["accuracy"], abs=1e-12)
            assert parts["sets"][name][step]["loss"] == pytest.approx(row[step]["loss"], rel=1e-5)
