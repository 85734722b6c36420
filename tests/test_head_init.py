"""Test-time head init from the support set (``eval.head_init = "prototypes"``, :mod:`metaprox.head_init`): step 0 is
the nearest-centroid classifier (cosine and Euclidean forms, computed here independently), the head's center is
the prototypes and the backbone's w, one test-time path, ``"prior"`` bitwise the old path, and the refusals."""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import metaprox
from metaprox.config import ConfigError, apply_overrides, resolve
from metaprox.evaluate import PeriodicValidation, adaptation_curve, evaluate_run
from metaprox.head_init import using_head_init
from metaprox.models.conv4 import Conv4
from metaprox.solve import PerTask

WAYS = 3


def _episodes(n_tasks: int, shots: int, image: tuple[int, ...], seed: int = 0) -> list[metaprox.Task]:
    """Episodes whose classes differ in mean (so nearest centroid is far from chance), labels 0..WAYS-1."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        means = 2.0 * torch.randn(WAYS, *image, generator=g)
        ys, yq = torch.arange(WAYS).repeat_interleave(shots), torch.arange(WAYS).repeat(4)
        tasks.append(metaprox.Task(means[ys] + 0.5 * torch.randn(len(ys), *image, generator=g), ys,
                                   means[yq] + 0.5 * torch.randn(len(yq), *image, generator=g), yq))
    return tasks


def _conv4(cosine_scale: float, num_classes: int = WAYS) -> Conv4:
    torch.manual_seed(3)
    return Conv4(in_channels=1, num_classes=num_classes, filters=4, image_size=16, bn="transductive",
                 cosine_scale=cosine_scale)


def _cosine_learner(**kw) -> metaprox.MetaMinibatchProx:
    model = _conv4(10.0)
    with torch.no_grad():  # a nonzero prior head, so "prior" and "prototypes" start apart
        model.head.weight.normal_()
        model.head.bias.normal_()
    return metaprox.MetaMinibatchProx(model, "cross_entropy", lam={"head.*": 0.1, "*": 100.0},
                                      inner=metaprox.Adam(lr=0.01, steps=4), **kw)


def test_cosine_step0_is_the_cosine_nearest_centroid_classifier():
    learner = _cosine_learner()
    learner.test_head_init = "prototypes"
    tasks = _episodes(4, shots=2, image=(1, 16, 16))
    curve = adaptation_curve(learner, tasks, 2, record=[0])
    for i, t in enumerate(tasks):
        fs, fq = _trunk_features_of(learner, t.x), _trunk_features_of(learner, t.x_query)  # query: its own batch
        centroids = torch.stack([fs[t.y == c].mean(0) for c in range(WAYS)])
        want = 10.0 * torch.nn.functional.cosine_similarity(fq.unsqueeze(1), centroids.unsqueeze(0), dim=-1)
        params = learner.adapt(t, steps=0)
        with torch.no_grad():
            logits = learner.predict(params, t.x_query)
        torch.testing.assert_close(logits, want, rtol=0, atol=2e-5)
        assert torch.equal(logits.argmax(1), want.argmax(1))
        assert float(curve.accuracy[0, i]) == pytest.approx(float((want.argmax(1) == t.y_query).double().mean()))
        assert torch.equal(params["head.bias"], torch.zeros(WAYS))
    assert float(curve.accuracy[0].mean()) > 0.5  # far from chance (1/3): the classes differ in mean


def test_plain_head_step0_is_the_euclidean_nearest_centroid_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 6), act=nn.Tanh(), head=nn.Linear(6, WAYS))).double()
    learner = metaprox.MetaMinibatchProx(model, "cross_entropy", lam=1.0, inner=metaprox.SGD(lr=0.1, steps=3))
    learner.test_head_init = "prototypes"
    tasks = [metaprox.Task(t.x.double(), t.y, t.x_query.double(), t.y_query) for t in _episodes(5, 3, (4,))]
    solved = learner.adapt_tasks(tasks, steps=0)
    curve = adaptation_curve(learner, tasks, 0)
    for sg in solved:
        for j, i in enumerate(sg.indices):
            t = tasks[i]
            with torch.no_grad():
                hs, hq = torch.tanh(model.body(t.x)), torch.tanh(model.body(t.x_query))
            centroids = torch.stack([hs[t.y == c].mean(0) for c in range(WAYS)])
            dist2 = torch.cdist(hq, centroids).square()
            params = {n: v[j] for n, v in zip(learner.names, sg.result.params, strict=True)}
            with torch.no_grad():
                logits = learner.predict(params, t.x_query)
            # 2μ·h − ‖μ‖² = ‖h‖² − ‖h − μ‖²: the logits are minus the squared distances, shifted per query
            torch.testing.assert_close(logits, hq.square().sum(1, keepdim=True) - dist2, rtol=0, atol=1e-12)
            assert torch.equal(logits.argmax(1), dist2.argmin(1))
            want_acc = float((dist2.argmin(1) == t.y_query).double().mean())
            assert float(curve.accuracy[0, i]) == want_acc
            # the center of the head's pull is the prototype rows; the backbone's is w
            center = dict(zip(learner.names, sg.center, strict=True))
            torch.testing.assert_close(center["head.weight"][j], 2 * centroids, rtol=0, atol=1e-12)
            torch.testing.assert_close(center["head.bias"][j], -centroids.square().sum(1), rtol=0, atol=1e-12)
            assert torch.equal(center["body.weight"][j], model.body.weight.detach())


def test_tree_prior_prototypes_use_each_tasks_node_backbone():
    """With a tree prior the backbone's center is the task's node: its features (so its prototypes) come from it."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 6), act=nn.Tanh(), head=nn.Linear(6, WAYS))).double()
    hm = metaprox.HierarchicalMMP(model, "cross_entropy", lam=2.0, lam_group=1.0,
                                  inner=metaprox.SGD(lr=0.5, steps=3), outer_lr=0.3)
    tasks = [metaprox.Task(t.x.double(), t.y, t.x_query.double(), t.y_query) for t in _episodes(4, 2, (4,), 2)]
    groups = ["a", "b", "a", "b"]
    for _ in range(3):
        hm.step(tasks, where=groups)
    nodes, _, _ = hm.test_prior(tasks, None, groups)
    body_w, body_b = (nodes[hm.names.index(n)] for n in ("body.weight", "body.bias"))
    assert not torch.allclose(body_w[0], body_w[1])  # the nodes' backbones differ
    hm.test_head_init = "prototypes"
    for sg in hm.adapt_tasks(tasks, steps=0, where=groups):
        center = dict(zip(hm.names, sg.center, strict=True))
        for j, i in enumerate(sg.indices):
            t = tasks[i]
            hs = torch.tanh(t.x @ body_w[i].T + body_b[i])
            mu = torch.stack([hs[t.y == c].mean(0) for c in range(WAYS)])
            torch.testing.assert_close(center["head.weight"][j], 2 * mu, rtol=0, atol=1e-12)
            assert torch.equal(center["body.weight"][j], body_w[i])


def test_prior_is_the_old_path_bitwise_and_prototypes_differ():
    learner = _cosine_learner()
    tasks = _episodes(3, shots=1, image=(1, 16, 16))
    assert learner.test_head_init == "prior"
    old = learner.solve(tasks, center=learner.center(), prox=learner.prox, monitor=False)  # the pre-feature path
    new = learner.adapt_tasks(tasks)
    for a, b in zip(old, new, strict=True):
        assert a.indices == b.indices
        assert all(torch.equal(p, q) for p, q in zip(a.result.params, b.result.params, strict=True))
    with using_head_init(learner, "prototypes"):
        proto = learner.adapt_tasks(tasks)
        assert isinstance(proto[0].center, PerTask)
    assert learner.test_head_init == "prior"  # restored
    head = learner.names.index("head.weight")
    assert not torch.allclose(proto[0].result.params[head], new[0].result.params[head])


def test_adapt_equals_the_curve_under_prototypes():
    learner = _cosine_learner()
    learner.test_head_init = "prototypes"
    tasks = _episodes(3, shots=2, image=(1, 16, 16), seed=1)
    curve = adaptation_curve(learner, tasks, 4)
    for i, t in enumerate(tasks):
        for k in (0, 2, 4):
            params = learner.adapt(t, steps=k)
            with torch.no_grad():
                loss = float(learner.loss.single(learner.predict(params, t.x_query), t.y_query))
            assert float(curve.loss[k, i]) == pytest.approx(loss, rel=1e-5)
    assert float(curve.loss[4].mean()) != pytest.approx(float(curve.loss[0].mean()))  # the solve moved


def test_refusals():
    mse = metaprox.MetaMinibatchProx(nn.Sequential(OrderedDict(body=nn.Linear(2, 3), head=nn.Linear(3, 1))), "mse")
    with pytest.raises(ValueError, match="regression"):
        mse.test_head_init = "prototypes"
    unnamed = metaprox.MetaMinibatchProx(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, WAYS)),
                                         "cross_entropy")
    with pytest.raises(ValueError, match="named 'head'"):
        unnamed.test_head_init = "prototypes"
    learner = _cosine_learner()
    with pytest.raises(ValueError, match="choose one of"):
        learner.test_head_init = "zeros"
    assert learner.test_head_init == "prior"  # a refused value leaves the setting alone
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    multi = metaprox.MultiHeadMMP(metaprox.SharedTrunk(trunk, heads={"a": nn.Linear(5, 2), "b": nn.Linear(5, 3)}),
                                  "cross_entropy")
    with pytest.raises(ValueError, match="one head"):
        multi.test_head_init = "prototypes"
    learner.test_head_init = "prototypes"
    t = _episodes(1, shots=2, image=(1, 16, 16))[0]
    gap = metaprox.Task(t.x[t.y != 1], t.y[t.y != 1], t.x_query, t.y_query)
    with pytest.raises(ValueError, match="no support example of class 1"):
        learner.adapt(gap)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        learner.adapt(metaprox.Task(t.x, t.y + 1, t.x_query, t.y_query))
    for sets, what in (({"task.family": "sine"}, "needs few-shot"), ({"eval.head_init": "zero"}, "choose 'prior'")):
        overrides = {"eval.head_init": "prototypes", **sets}
        with pytest.raises(ConfigError, match=what):
            resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))


def test_config_reaches_eval_and_periodic_validation(omniglot_root, tmp_path):
    """``eval.head_init`` through ``evaluate_run`` (``metaprox eval``) and the periodic validation: the same numbers
    as the curve under the learner's setting, and step 0 is the nearest-centroid accuracy."""
    from metaprox.build import build_family, build_inner
    from metaprox.rundir import load_learner
    from metaprox.train import train

    torch.set_num_threads(1)
    sets = {"task.family": "fewshot", "task.dataset": "omniglot", "task.data_path": str(omniglot_root),
            "task.split": "background", "task.val_alphabets": 1, "task.ways": 2, "task.shots": 1,
            "task.train_shots": 2, "task.eval_queries": 2, "model.kind": "conv4", "model.filters": 4,
            "model.bn": "transductive", "model.cosine_scale": 10.0, "prox.lam": 1.0, "inner.solver": "adam",
            "inner.lr": 0.01, "inner.steps": 2, "outer.steps": 1, "outer.meta_batch": 2, "eval.tasks": 6,
            "eval.steps": [0, 3], "log.eval_tasks": 4, "eval.head_init": "prototypes"}
    cfg = resolve(apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]))
    train(cfg, tmp_path / "run", progress=False, evaluate=False)
    result = evaluate_run(tmp_path / "run", split="val")
    assert result["test_time"]["head_init"] == "prototypes"
    assert (tmp_path / "run" / "eval-val-head_prototypes.json").is_file()
    learner, cfg, _ = load_learner(tmp_path / "run")
    inner = build_inner(cfg, lr=cfg["eval"]["lr"])
    ((name, tasks),) = build_family(cfg).eval_sets("val").items()
    learner.test_head_init = "prototypes"
    curve = adaptation_curve(learner, tasks, 3, inner=inner)
    assert result["sets"][name]["3"]["accuracy"] == pytest.approx(float(curve.accuracy[3].mean()), abs=1e-12)
    hits = []
    for t in tasks:
        fs, fq = _trunk_features_of(learner, t.x), _trunk_features_of(learner, t.x_query)
        centroids = torch.stack([fs[t.y == c].mean(0) for c in range(2)])
        cos = torch.nn.functional.cosine_similarity(fq.unsqueeze(1), centroids.unsqueeze(0), dim=-1)
        hits.append((cos.argmax(1) == t.y_query).double().mean())
    assert result["sets"][name]["0"]["accuracy"] == pytest.approx(float(torch.stack(hits).mean()), abs=1e-12)
    learner.test_head_init = "prior"
    periodic = PeriodicValidation(cfg)(learner)  # sets the config's head init for its own call only
    assert learner.test_head_init == "prior"
    with using_head_init(learner, "prototypes"):
        small = adaptation_curve(learner, PeriodicValidation(cfg).sets[name], 3, inner=inner)
    assert periodic["accuracy"][name]["3"] == pytest.approx(float(small.accuracy[3].mean()), abs=1e-12)


def _trunk_features_of(learner: metaprox.MetaLearner, x: torch.Tensor) -> torch.Tensor:
    """Independent of the library's path: a head-less copy of a Conv-4 learner's model (num_classes = 0 returns
    the features the head would see, s·h/‖h‖) on ``x`` as one batch."""
    model = learner.model
    trunk = Conv4(in_channels=model.in_channels, num_classes=0, filters=model.filters,
                  image_size=model.image_size, bn=model.bn, cosine_scale=model.cosine_scale)
    trunk.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        return trunk(x)
