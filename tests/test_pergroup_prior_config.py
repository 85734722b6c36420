"""Per-group tree priors from the config (``[[prior.groups]]`` of a ``prior.kind = "tree"`` finite run): the config
builds FiniteMMP's tree with the groups, ``metaprox train`` runs it (flat parameters: one value at every node),
and every problem of the groups is listed at once; patterns that match no parameter are named."""

from __future__ import annotations

import pytest
import torch

from metaprox.build import build_finite
from metaprox.checkpoint import load_checkpoint
from metaprox.config import apply_overrides, parse_value, resolve
from metaprox.finite_data import load_finite_data
from metaprox.train import train
from metaprox.validate import config_problems
from test_finite_prior_config import NODES
from test_train_finite import overrides, write_survey

GROUPS = '[{pattern = "weight", kind = "tree"}, {pattern = "*", kind = "flat"}]'  # as given to --set


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("multitask")
    write_survey(d)
    return d


def _cfg(data_dir, groups: str = GROUPS, **extra):
    sets = overrides(data_dir, **{"prior.kind": "tree", "prior.task_nodes": NODES, "prior.lam_levels": [0.7, 2.0],
                                  "finite.center_update": "exact", **extra})
    return resolve(apply_overrides({}, [*sets, f"prior.groups={groups}"]))


def test_a_per_group_tree_from_the_config_trains_with_one_flat_value_per_node(data_dir, tmp_path):
    cfg = _cfg(data_dir)
    assert cfg["prior"]["groups"] == parse_value(GROUPS)
    fd = load_finite_data(cfg)
    learner = build_finite(cfg, fd.tasks("train"), fd)
    assert learner.prior.follows == {"weight": True, "bias": False}
    train(cfg, tmp_path / "run")
    state, _ = load_checkpoint(tmp_path / "run")
    theta = state["buffers"]["tree_theta"]
    bias = theta[:, -1]  # Linear rows are (weight…, bias)
    assert torch.equal(bias, bias[0].expand_as(bias))
    assert float((theta[:, :-1] - theta[:1, :-1]).abs().max()) > 1e-3  # the weights differ across nodes


def test_every_problem_of_the_groups_is_listed_at_once(data_dir):
    cfg = _cfg(data_dir, groups='[{pattern = "", kind = "forest"}, {kind = "tree"}, "weight"]')
    problems = config_problems(cfg)
    for text in ("prior.groups[0].pattern", "prior.groups[0].kind = 'forest'", "prior.groups[1] =",
                 "prior.groups[2] = 'weight'"):
        assert any(text in p for p in problems), (text, problems)
    flat = _cfg(data_dir, groups='[{pattern = "*", kind = "flat"}]')
    assert any("no parameter would follow the tree" in p for p in config_problems(flat))
    graph = resolve(apply_overrides({}, [*overrides(data_dir, **{"prior.kind": "graph", "prior.edges": [[0, 1, 1.0]]}),
                                         f"prior.groups={GROUPS}"]))
    assert any("prior.groups is set but prior.kind = 'graph'" in p for p in config_problems(graph))


def test_a_pattern_that_matches_no_parameter_is_named(data_dir):
    cfg = _cfg(data_dir, groups='[{pattern = "head.*", kind = "tree"}]')
    assert not [p for p in config_problems(cfg) if "prior.groups" in p]  # the names come with the model
    fd = load_finite_data(cfg)
    with pytest.raises(ValueError, match=r"pattern 'head.\*' matches no parameter; the parameters are \['weight', "
                                         r"'bias'\]"):
        build_finite(cfg, fd.tasks("train"), fd)
