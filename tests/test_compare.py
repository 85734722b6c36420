"""`metaprox compare`: a tiny comparison writes its report; compare-config errors are clear; periodic validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.cli import main
from metaprox.compare import load_compare_config, resolve_compare
from metaprox.config import ConfigError, resolve

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "compare_sine.toml")

TINY = ["algorithms=[\"mmp\",\"fomaml\"]", "shared.outer.steps=6", "shared.outer.meta_batch=4",
        "shared.inner.steps=2", "shared.eval.tasks=4", "shared.eval.points=20", "shared.eval.steps=[0,1,2]",
        "shared.log.every=3", "shared.log.eval_every=3", "shared.log.eval_tasks=2", "shared.log.checkpoint_every=6",
        "bench.curve_step=2", "bench.memory_steps=[1]", "bench.memory_tasks=4", "bench.throughput_tasks=4",
        "bench.throughput_steps=2", "bench.throughput_rounds=1", "tune=false"]


def test_shipped_config_resolves():
    cfg = load_compare_config(CONFIG)
    runs = cfg["runs"]
    assert list(runs) == ["mmp", "maml", "fomaml", "reptile", "imaml"]
    budget = {(r["outer"]["steps"], r["outer"]["meta_batch"], r["inner"]["steps"], json.dumps(r["task"]))
              for r in runs.values()}
    assert len(budget) == 1, "every algorithm must get the same budget"
    assert runs["maml"]["inner"]["lr"] == 0.01 and runs["maml"]["outer"]["optimizer"] == "adam"
    assert runs["mmp"]["rule"]["inner_data"] == "support+query"


def test_tiny_compare_writes_report(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["compare", CONFIG, "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    assert main(args) == 0
    for name in ("README.md", "results.json", "test_mse_vs_steps.png", "val_mse_vs_time.png",
                 "memory_vs_steps.png", ".gitignore", "runs/mmp/eval.json", "runs/fomaml/val_curve.jsonl"):
        assert (out / name).is_file(), name
    md = (out / "README.md").read_text()
    assert "metaprox compare" in md.splitlines()[5]  # the regenerating command comes first
    assert "| mmp | 5-shot |" in md and "| fomaml | 10-shot |" in md
    res = json.loads((out / "results.json").read_text())
    assert set(res["algorithms"]) == {"mmp", "fomaml"}
    assert len(res["algorithms"]["mmp"]["val_curve"]) == 3  # iterations 0, 3, 6
    assert {r["rule"] for r in res["throughput"]["rows"]} == {"mmp", "fomaml"}
    assert res["algorithms"]["fomaml"]["train"]["peak_rss_mib"] > 0
    # a second call reuses the finished runs (and here skips the benchmarks: one memory point of one rule)
    assert main([*args, "--set", "algorithms=[\"mmp\"]"]) == 0
    assert json.loads((out / "results.json").read_text())["algorithms"]["mmp"]["train"]["reused"] is True


@pytest.mark.parametrize("raw, message", [
    ({"algorithms": ["mmp"], "shared": {}, "typo": 1}, "unknown compare config key"),
    ({"algorithms": ["mmp"], "shared": {"outer": {"lrr": 1}}}, "[shared]: unknown config key 'outer.lrr'"),
    ({"algorithms": ["mmp"], "per_algorithm": {"mmp": {"outer": {"steps": 5}}}}, "common budget"),
    ({"algorithms": ["mmp"], "per_algorithm": {"mmp": {"task": {"train_points": 5}}}}, "common budget"),
    ({"algorithms": ["mmp"], "per_algorithm": {"mamll": {}}}, "neither in `algorithms`"),
    ({"algorithms": ["nope"]}, "unknown rule 'nope'"),
    ({"algorithms": []}, "non-empty list"),
    ({"algorithms": ["mmp"], "bench": {"memory_step": [1]}}, "unknown [bench] key"),
    ({"algorithms": ["mmp"], "bench": {"curve_step": 7}}, "curve_step"),
    ({"algorithms": ["imaml"], "per_algorithm": {"imaml": {"prox": {"lam": 0}}}}, "algorithm 'imaml': prox.lam = 0"),
])
def test_config_errors(raw, message):
    with pytest.raises(ConfigError) as e:
        resolve_compare(raw)
    assert message in str(e.value)


def test_label_with_explicit_rule():
    cfg = resolve_compare({"algorithms": ["maml_fo"], "per_algorithm": {"maml_fo": {
        "algorithm": "maml", "prox": {"lam": 0}, "rule": {"first_order": True}}}})
    assert cfg["runs"]["maml_fo"]["algorithm"] == "maml" and cfg["runs"]["maml_fo"]["name"] == "maml_fo"


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", CONFIG, "--out", str(tmp_path / "o"), "--set", "per_algorithm.maml.inner.steps=3"]) == 2
    assert "common budget" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::metaprox.InexactInnerSolveWarning")
def test_periodic_validation_leaves_training_unchanged(tmp_path):
    from metaprox.rundir import load_learner, read_metrics
    from metaprox.train import VAL_CURVE, train

    base = {"outer": {"steps": 4, "meta_batch": 2}, "inner": {"steps": 2, "batch_size": 5},
            "eval": {"tasks": 3, "steps": [0, 2]}, "log": {"every": 2, "checkpoint_every": 4, "tensorboard": "false"}}
    plain = resolve(base)
    with_val = resolve({**base, "log": {**base["log"], "eval_every": 2, "eval_tasks": 2}})
    train(plain, tmp_path / "a", progress=False, evaluate=False)
    train(with_val, tmp_path / "b", progress=False, evaluate=False)
    pa, pb = load_learner(tmp_path / "a")[0].center(), load_learner(tmp_path / "b")[0].center()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    rows = read_metrics(tmp_path / "b", VAL_CURVE)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert set(rows[0]["sets"]) == {"5-shot", "10-shot"} and set(rows[0]["sets"]["5-shot"]) == {"0", "2"}
    assert not (tmp_path / "a" / VAL_CURVE).exists()
    with pytest.raises(ConfigError, match="eval_every"):
        resolve({"log": {"eval_every": -1}})


def test_fewshot_compare_reports_accuracy_not_mse(tmp_path):
    """A classification comparison is reported in accuracy (%), with the episode protocol — it was rendered as
    "sine regression" with the cross-entropy under an "MSE" header."""
    from _tiny_omniglot import make_omniglot

    make_omniglot(tmp_path / "omniglot")
    out = tmp_path / "report"
    fewshot = [f"shared.task.data_path=\"{tmp_path / 'omniglot'}\"", "shared.task.split=\"background\"",
               "shared.task.val_alphabets=1", "shared.task.ways=2", "shared.task.shots=1",
               "shared.task.train_shots=1", "shared.task.queries=2", "shared.task.eval_queries=2",
               "shared.model.filters=4", "shared.eval.tasks=4", "shared.eval.steps=[0,1,2]",
               "shared.outer.steps=4", "shared.inner.steps=2", "shared.log.every=2", "shared.log.eval_every=2",
               "shared.log.eval_tasks=2", "shared.log.checkpoint_every=4", "algorithms=[\"mmp\",\"fomaml\"]",
               "bench.curve_step=2", "bench.memory_steps=[1]", "bench.memory_tasks=2", "bench.throughput_tasks=2",
               "bench.throughput_steps=1", "bench.throughput_rounds=1", "tune=false"]
    args = ["compare", str(Path(CONFIG).with_name("compare_omniglot.toml")), "--out", str(out)]
    for o in fewshot:
        args += ["--set", o]
    assert main(args) == 0
    md = (out / "README.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "omniglot 2-way 1-shot classification" in md.splitlines()[0] and "MSE" not in md
    row = res["algorithms"]["mmp"]["test"]["sets"]["2-way 1-shot"]["2"]
    assert f"| {100 * row['accuracy']:.3f} ± {100 * row['accuracy_ci95']:.3f} |" in md  # the accuracy, in %
    assert (out / "test_accuracy_vs_steps.png").is_file() and (out / "val_accuracy_vs_time.png").is_file()
