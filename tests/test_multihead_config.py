"""Multi-head few-shot from a config (``[heads] ways = [...]``): `metaprox train` runs MultiHeadMMP over a shared
Conv-4 trunk with one head per way, on a tiny generated Omniglot (tests/_tiny_omniglot.py; no shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.algorithms.multihead import MultiHeadMMP
from metaprox.build import build_family
from metaprox.config import ConfigError, apply_overrides, load_config, resolve
from metaprox.evaluate import evaluate_run
from metaprox.train import train
from metaprox.validate import config_problems, validate_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot_mixed_ways_multihead_cpu.toml"


def tiny(root: Path, **extra) -> dict:
    sets = {"name": "tiny-multihead", "execution": "loop", "task.family": "fewshot", "task.dataset": "omniglot",
            "task.data_path": str(root), "task.split": "background", "task.val_alphabets": 1, "task.shots": 1,
            "task.eval_queries": 2, "heads.ways": [2, 3], "model.kind": "conv4", "model.filters": 4,
            "model.bn": "transductive", "prox.lam": 1.0, "inner.solver": "adam", "inner.lr": 0.01,
            "inner.beta1": 0.0, "inner.steps": 2, "outer.lr": 1.0, "outer.steps": 4, "outer.meta_batch": 2,
            "eval.tasks": 4, "eval.steps": [0, 2], "log.every": 1, "log.checkpoint_every": 2, **extra}
    return resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))


def test_a_mixed_way_run_trains_resumes_bitwise_and_evaluates_each_kind(omniglot_root, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny(omniglot_root)
    family = build_family(cfg)
    batch = family.train_batch(4, torch.Generator().manual_seed(0))
    assert batch.kinds == ["2way", "3way", "2way", "3way"]  # KindedTasks: MultiHeadMMP.step reads them
    assert [int(t.y.max()) + 1 for t in batch] == [2, 3, 2, 3]  # each task has its kind's ways

    result = train({**cfg, "log": {**cfg["log"], "eval_every": 2, "eval_tasks": 2}}, tmp_path / "whole",
                   progress=False)  # periodic validation adapts each kind's set with its head, too
    val = [json.loads(line) for line in (tmp_path / "whole" / "val_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 2, 4] and set(val[0]["accuracy"]) == {"2way", "3way"}
    assert set(result["sets"]) == {"2way", "3way"}
    for kind, ways in (("2way", 2), ("3way", 3)):  # before adaptation the zero heads predict every class alike
        assert result["sets"][kind]["0"]["accuracy"] == pytest.approx(1.0 / ways)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["phi"] > 0 for r in rows)

    train(cfg, tmp_path / "split", progress=False, stop_at=2, evaluate=False)
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False)
    whole = json.loads((tmp_path / "whole" / "checkpoint.json").read_text())
    split = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert whole["step"] == split["step"] == 4
    from metaprox.rundir import load_learner

    a, _, _ = load_learner(tmp_path / "whole")
    b, _, _ = load_learner(tmp_path / "split")
    assert isinstance(a, MultiHeadMMP)
    for p, q in zip(a.center(), b.center(), strict=True):
        assert torch.equal(p, q)
    same = json.dumps(result["sets"])  # as text: the curves hold NaN at the steps not recorded
    assert json.dumps(resumed["sets"]) == same
    # `metaprox eval` (the learner rebuilt from the checkpoint) gives the end-of-training numbers
    assert json.dumps(evaluate_run(tmp_path / "whole", write=False)["sets"]) == same


def test_every_problem_of_a_heads_config_is_listed_at_once(omniglot_root):
    cfg = tiny(omniglot_root, **{"heads.ways": [3, 3], "heads.head_init": "random", "algorithm": "reptile",
                                 "model.bn": "batch", "execution": "auto", "outer.meta_batch": 1})
    problems = config_problems(cfg)
    for text in ("distinct ways", "algorithm must be 'mmp'", "head_init", "model.bn = 'transductive'",
                 "execution = 'loop'", "meta_batch = 1 < 2 kinds"):
        assert any(text in p for p in problems), (text, problems)
    with pytest.raises(ConfigError, match="problems, nothing was run"):
        validate_run(cfg)


def test_the_shipped_mixed_way_config_is_valid(omniglot_root):
    cfg = load_config(CONFIG, [f"task.data_path={json.dumps(str(omniglot_root))}"])
    assert cfg["heads"]["ways"] == [5, 20]
    assert not [p for p in config_problems(cfg) if "data file" not in p]  # the tiny fixture has no split lists
