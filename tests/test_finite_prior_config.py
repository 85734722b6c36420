"""Config keys for the finite priors (``[prior]``: a tree from a task → node list or a CSV column, a graph from an
edge list or CSV): the config builds the same learner as Python, ``metaprox train`` runs it and resumes it
bitwise, and bad priors are config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaprox.algorithms.finite import FiniteMMP
from metaprox.build import build_finite, build_prior
from metaprox.checkpoint import load_checkpoint
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.finite_data import load_finite_data
from metaprox.priors import Graph, Tree
from metaprox.tasks.taskset import TaskSet
from metaprox.train import train
from test_train_finite import TASKS, overrides, write_survey

NODES = ["a/x", "a/x", "a/y", "a/y", "b", "b", "b", "a/x", "b"]
EDGES = [[0, 1, 0.5], [1, 2, 1.0], [4, 8, 0.25]]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multitask")
    write_survey(d)
    return d


def _cfg(data_dir, **extra):
    return resolve(apply_overrides({}, overrides(data_dir, **{"finite.sample": "all", **extra})))


def test_a_tree_from_task_nodes_is_the_python_tree(data_dir):
    cfg = _cfg(data_dir, **{"prior.kind": "tree", "prior.task_nodes": NODES, "prior.lam_levels": [0.7, 2.0],
                            "finite.center_update": "exact"})
    fd = load_finite_data(cfg)
    train_tasks = fd.tasks("train")
    got = build_finite(cfg, train_tasks, fd)
    parent = {"root": None, "a": "root", "a/x": "a", "a/y": "a", "b": "root"}
    tree = Tree(parent, NODES, [0.7, 2.0])
    torch.manual_seed(cfg["seed"])
    model = torch.nn.Linear(train_tasks[0].x.shape[1], 1).to(torch.float64)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    want = FiniteMMP(model, TaskSet(train_tasks), "mse", lam=2.0, prior=tree, center_update="exact",
                     inner=got.inner, meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.2), outer_lr=0.2,
                     schedule="constant")
    assert got.prior.parent == tree.parent and np.array_equal(got.prior.task_node, tree.task_node)
    for _ in range(3):
        got.step()
        want.step()
    assert torch.equal(got.theta, want.theta) and torch.equal(got.w_row(), want.w_row())


def test_csv_sources_equal_the_inline_lists(data_dir, tmp_path):
    nodes_csv = tmp_path / "nodes.csv"
    nodes_csv.write_text("task,terrain\n" + "".join(f"{i},{n}\n" for i, n in enumerate(NODES)))
    edges_csv = tmp_path / "edges.csv"
    edges_csv.write_text("t,s,weight\n" + "".join(f"{t},{s},{w}\n" for t, s, w in EDGES))
    w = torch.ones(TASKS, dtype=torch.float64)
    inline = build_prior(_cfg(data_dir, **{"prior.kind": "tree", "prior.task_nodes": NODES,
                                           "prior.lam_levels": [1.0, 1.0], "finite.center_update": "exact"}),
                         TASKS, w)["prior"]
    from_csv = build_prior(_cfg(data_dir, **{"prior.kind": "tree", "prior.nodes_csv": str(nodes_csv),
                                             "prior.nodes_column": "terrain", "prior.lam_levels": [1.0, 1.0],
                                             "finite.center_update": "exact"}), TASKS, w)["prior"]
    assert inline.parent == from_csv.parent and np.array_equal(inline.task_node, from_csv.task_node)
    g1 = build_prior(_cfg(data_dir, **{"prior.kind": "graph", "prior.edges": EDGES}), TASKS, w)["graph"]
    g2 = build_prior(_cfg(data_dir, **{"prior.kind": "graph", "prior.edges_csv": str(edges_csv)}), TASKS, w)["graph"]
    assert isinstance(g1, Graph) and all(np.array_equal(a, b) for a, b in zip(g1.edges, g2.edges, strict=True))


@pytest.mark.parametrize("kind", ["tree", "graph"])
def test_metaprox_train_runs_and_resumes_a_prior_bitwise(data_dir, tmp_path, kind):
    extra = {"prior.kind": kind, "finite.sample": "without_replacement"}
    extra.update({"prior.task_nodes": NODES, "prior.lam_levels": [0.7, 2.0], "finite.center_update": "exact"}
                 if kind == "tree" else {"prior.edges": EDGES})
    cfg = resolve(apply_overrides({}, overrides(data_dir, **extra)))
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "split", stop_at=4, evaluate=False)
    again = train(cfg, tmp_path / "split", resume=True)
    assert full["J"] == again["J"] and full["test"] == again["test"]
    a, _ = load_checkpoint(tmp_path / "full")
    b, _ = load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    if kind == "tree":
        assert torch.equal(a["buffers"]["tree_theta"], b["buffers"]["tree_theta"])


@pytest.mark.parametrize("extra, match", [
    ({"prior.kind": "tree", "prior.task_nodes": NODES}, "center_update = 'exact'"),
    ({"prior.kind": "tree", "prior.task_nodes": NODES[:3], "finite.center_update": "exact"}, "one node per task"),
    ({"prior.kind": "graph", "prior.edges": [[0, 99, 1.0]]}, "out of range"),
    ({"prior.kind": "forest"}, "choose 'flat', 'tree' or 'graph'"),
])
def test_bad_priors_are_config_errors(data_dir, extra, match):
    with pytest.raises(ConfigError, match=match):
        cfg = _cfg(data_dir, **extra)
        build_prior(cfg, TASKS, torch.ones(TASKS, dtype=torch.float64))


def test_reptile_on_the_finite_set_from_config_runs_and_resumes_bitwise(data_dir, tmp_path):
    """``finite.rule = "reptile"``: Reptile with a TaskMemory over the same store shards and checkpoints."""
    cfg = resolve(apply_overrides({}, overrides(data_dir, **{"finite.rule": "reptile", "prox.lam": 0})))
    full = train(cfg, tmp_path / "full")
    assert full["J"] is None and full["test"]["metric"] == "rmse" and np.isfinite(full["test"]["value"])
    train(cfg, tmp_path / "split", stop_at=5, evaluate=False)
    again = train(cfg, tmp_path / "split", resume=True)
    assert full["test"] == again["test"]
    a, _ = load_checkpoint(tmp_path / "full")
    b, _ = load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    # the same as Python: Reptile + TaskMemory, stepped as the run was
    fd = load_finite_data(cfg)
    learner = build_finite(cfg, fd.tasks("train"), fd)
    for _ in range(cfg["outer"]["steps"]):
        learner.step(monitor=False)
    assert all(torch.equal(p.detach(), a["params"][n]) for n, p in zip(learner.names, learner.fmodel.params(),
                                                                        strict=True))


@pytest.mark.parametrize("extra, match", [
    ({"finite.rule": "fomaml"}, "no query set"),
    ({"finite.rule": "reptile", "finite.center_update": "exact"}, "TaskMemory"),
])
def test_finite_rules_refused_with_the_reason(data_dir, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        train(resolve(apply_overrides({}, overrides(data_dir, **extra))), tmp_path / "run")
