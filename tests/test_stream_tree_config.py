"""A tree prior over the task stream from a config (``prior.kind = "tree"``, ``task.group_by = "alphabet"``):
`metaprox train` runs a rule with a TreePrior whose nodes are the episodes' alphabets, on a tiny generated
Omniglot (tests/_tiny_omniglot.py; no shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaprox.build import build_family, build_learner
from metaprox.config import ConfigError, apply_overrides, load_config, resolve
from metaprox.evaluate import adaptation_curve, evaluate_run
from metaprox.priors import TreePrior
from metaprox.rundir import load_learner
from metaprox.tasks.grouped import GroupedTasks
from metaprox.train import train
from metaprox.validate import config_problems, validate_run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniglot_alphabet_tree_cpu.toml"


def tiny(root: Path, **extra) -> dict:
    sets = {"name": "tiny-tree", "task.family": "fewshot", "task.dataset": "omniglot", "task.data_path": str(root),
            "task.split": "background", "task.val_alphabets": 1, "task.ways": 2, "task.shots": 1,
            "task.eval_queries": 2, "task.group_by": "alphabet", "prior.kind": "tree", "prior.lam_levels": [2.0],
            "prior.group_lr": 0.5, "model.kind": "conv4", "model.filters": 4, "prox.lam": 1.0,
            "inner.solver": "adam", "inner.lr": 0.01, "inner.steps": 2, "outer.lr": 0.5, "outer.steps": 4,
            "outer.meta_batch": 3, "eval.tasks": 4, "eval.steps": [0, 2], "log.every": 1,
            "log.checkpoint_every": 2, **extra}
    return resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))


def test_an_alphabet_tree_run_trains_resumes_bitwise_and_evaluates(omniglot_root, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny(omniglot_root)
    batch = build_family(cfg).train_batch(6, torch.Generator().manual_seed(0))
    assert isinstance(batch, GroupedTasks) and set(batch.groups) <= {"A1", "A2", "A3"}  # A4 held out (val)

    result = train({**cfg, "log": {**cfg["log"], "eval_every": 2, "eval_tasks": 2}}, tmp_path / "whole",
                   progress=False)
    val = [json.loads(line) for line in (tmp_path / "whole" / "val_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 2, 4]
    train(cfg, tmp_path / "split", progress=False, stop_at=2, evaluate=False)
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False)
    a, _, _ = load_learner(tmp_path / "whole")
    b, _, _ = load_learner(tmp_path / "split")
    assert isinstance(a.hierarchy, TreePrior) and a.step_count == 4
    assert sorted(a.hierarchy.nodes) == sorted(b.hierarchy.nodes) and len(a.hierarchy.nodes) >= 2
    for p, q in zip(a.center(), b.center(), strict=True):
        assert torch.equal(p, q)
    for path, center in a.hierarchy.nodes.items():  # the alphabets' centers travel with the checkpoint
        for p, q in zip(center, b.hierarchy.nodes[path], strict=True):
            assert torch.equal(p, q)
        assert any(not torch.equal(p, w) for p, w in zip(center, a.center(), strict=True))  # the nodes moved
    same = json.dumps(result["sets"])  # as text: the curves hold NaN at the steps not recorded
    assert json.dumps(resumed["sets"]) == same
    # `metaprox eval` (the learner rebuilt from the checkpoint) gives the end-of-training numbers
    assert json.dumps(evaluate_run(tmp_path / "whole", write=False)["sets"]) == same


def test_evaluation_adapts_a_seen_alphabet_from_its_node_and_an_unseen_one_from_the_root(omniglot_root, tmp_path):
    """Step 0 of the test-time curve is the center itself: the node's for a seen alphabet, w for an unseen one."""
    torch.set_num_threads(1)
    cfg = tiny(omniglot_root, **{"task.split": "background", "task.val_alphabets": 0})
    train(cfg, tmp_path / "run", progress=False, evaluate=False)
    learner, _, _ = load_learner(tmp_path / "run")
    task = next(iter(build_family(cfg).eval_sets("test").values()))[0]  # an episode with a query set
    seen = next(iter(learner.hierarchy.nodes))  # a node trained on (the evaluation alphabets E1, E2 never are)

    def loss_at(params) -> float:
        named = dict(zip(learner.names, params, strict=True))  # Conv-4's test-time BN protocol, as evaluation
        out = learner.fmodel.module.predict(task.x, task.x_query, named)
        return float(torch.nn.functional.cross_entropy(out, task.y_query))

    node = learner.hierarchy.node_center(seen)
    for group, center in ((seen[0], node), ("E1", learner.center())):
        tasks = GroupedTasks([task], [group])
        curve = adaptation_curve(learner, tasks, 1, where=tasks.groups)
        assert float(curve.loss[0, 0]) == pytest.approx(loss_at(center), rel=1e-5)
    assert loss_at(node) != pytest.approx(loss_at(learner.center()), rel=1e-5)  # the check can tell them apart


def test_every_rule_the_composition_allows_trains_with_a_tree_and_second_order_maml_is_refused(omniglot_root,
                                                                                               tmp_path):
    torch.set_num_threads(1)
    for algo, extra in (("reptile", {}), ("fomaml", {"task.queries": 1}), ("imaml", {"task.queries": 1}),
                        ("maml", {"task.queries": 1, "rule.first_order": True, "inner.solver": "sgd"})):
        cfg = tiny(omniglot_root, **{"algorithm": algo, "outer.steps": 2, **extra})
        train(cfg, tmp_path / algo, progress=False, evaluate=False)
        learner, _, _ = load_learner(tmp_path / algo)
        assert learner.step_count == 2 and learner.hierarchy.nodes, algo
    cfg = tiny(omniglot_root, **{"algorithm": "maml", "task.queries": 1, "inner.solver": "sgd"})
    assert any("second-order MAML" in p and "first_order" in p for p in config_problems(cfg))
    with pytest.raises(ConfigError, match="second-order MAML"):
        build_learner(cfg)  # the learner refuses it too (composition.refuse), with the same reason


def test_every_problem_of_a_stream_tree_config_is_listed_at_once(omniglot_root):
    cfg = tiny(omniglot_root, **{"prior.task_nodes": ["a"], "prior.lam_levels": [0.0], "prior.group_lr": -1.0,
                                 "eval.lam": 0.5})
    cfg["task"]["group_by"] = None  # unset (TOML has no null)
    cfg["prior"]["groups"] = [{"pattern": "*", "kind": "flat"}]  # TOML tables (not --set values)
    cfg["prox"]["lam"] = {"*": 1.0}
    problems = config_problems(cfg)
    for text in ("needs each episode's node: set task.group_by", "prior.task_nodes / prior.nodes_csv",
                 "prior.lam_levels = [0.0]", "prior.group_lr = -1.0", "prox.lam is a table", "eval.lam is set",
                 "no group has kind = 'tree'"):
        assert any(text in p for p in problems), (text, problems)
    with pytest.raises(ConfigError, match="problems, nothing was run"):
        validate_run(cfg)
    wrong = tiny(omniglot_root, **{"task.family": "sine", "model.kind": "mlp", "heads.ways": [2, 3]})
    assert any("group_by = 'alphabet' is for task.family = 'fewshot'" in p for p in config_problems(wrong))
    deep = tiny(omniglot_root, **{"prior.lam_levels": [1.0, 2.0], "prior.group_lr": [0.5]})
    assert any("one per depth of prior.lam_levels (2)" in p for p in config_problems(deep))
    with pytest.raises(ConfigError, match="prior.kind = 'graph' needs algorithm = 'finite_mmp'"):
        tiny(omniglot_root, **{"prior.kind": "graph"})


def test_the_shipped_alphabet_tree_config_is_valid(omniglot_root):
    cfg = load_config(CONFIG, [f"task.data_path={json.dumps(str(omniglot_root))}"])
    assert cfg["prior"]["kind"] == "tree" and cfg["task"]["group_by"] == "alphabet"
    assert not [p for p in config_problems(cfg) if "data file" not in p]  # the tiny fixture has no split lists


def test_prior_groups_put_only_the_head_on_the_alphabet_tree(omniglot_root, tmp_path):
    """``[[prior.groups]]`` over a stream: the head's centers are the alphabets' nodes, the trunk's center is w."""
    torch.set_num_threads(1)
    cfg = tiny(omniglot_root, **{"outer.steps": 2})
    cfg["prior"]["groups"] = [{"pattern": "head.*", "kind": "tree"}]  # unmatched parameters: flat
    train(cfg, tmp_path / "run", progress=False, evaluate=False)
    learner, _, _ = load_learner(tmp_path / "run")
    assert learner.hierarchy.follows == [n.startswith("head.") for n in learner.names]
    for path in learner.hierarchy.nodes:
        for name, c, w in zip(learner.names, learner.hierarchy.node_center(path), learner.center(), strict=True):
            assert torch.equal(c, w) != name.startswith("head."), name  # the head moved off w, the trunk is w


def test_grouped_episodes_under_the_flat_prior_train_and_evaluate_from_w(omniglot_root, tmp_path):
    """``task.group_by`` alone (the flat baseline of the alphabet study): the groups are ignored by the prior."""
    torch.set_num_threads(1)
    cfg = tiny(omniglot_root, **{"prior.kind": "flat", "outer.steps": 2})
    assert not config_problems(cfg)
    result = train(cfg, tmp_path / "run", progress=False)
    learner, _, _ = load_learner(tmp_path / "run")
    assert learner.hierarchy is None and learner.step_count == 2
    assert json.dumps(evaluate_run(tmp_path / "run", write=False)["sets"]) == json.dumps(result["sets"])
