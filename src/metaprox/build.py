"""Config → objects: the model, the task family, the inner solver and the meta-learner of a run — for a task
stream (:func:`build_learner`, :func:`build_family`) and for a finite task set (:func:`build_finite` on the tasks
of :func:`metaprox.finite_data.load_finite_data`, its model :func:`finite_model`).

Task families registered here give the trainer ``train_batch(n, generator)`` (meta-training tasks),
``train_share(n, generator, part)`` (only the tasks ``part`` of that minibatch, as a
:class:`~metaprox.tasks.share.TaskShare`, the generator advanced as by ``train_batch``: what a torchrun rank
builds) and ``eval_sets(split)`` (named lists of test tasks with query sets, e.g. ``{"5-shot": [...]}``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metaprox.algorithms import ALGORITHMS
from metaprox.algorithms.base import MetaLearner
from metaprox.algorithms.finite import FiniteMMP
from metaprox.config import ConfigError
from metaprox.finite_data import FiniteData
from metaprox.memory import TaskMemory
from metaprox.models.mlp import MLP
from metaprox.prox import RobustL2
from metaprox.solvers import SGD, Adam, ExactLeastSquares, InnerSolver
from metaprox.tasks.share import TaskShare
from metaprox.tasks.sine import SineFamily
from metaprox.tasks.task import Task
from metaprox.tasks.taskset import TaskSampler, TaskSet

__all__ = ["build_model", "build_inner", "build_learner", "build_family", "build_prior", "rule_options", "FAMILIES",
           "ALGORITHMS", "optimizer_factory", "finite_model", "build_finite", "finite_lam",
           "finite_sampler"]

class SineTasks:
    """The sine family bound to a run config."""

    def __init__(self, cfg: dict[str, Any]):
        t = cfg["task"]
        self.family = SineFamily(*t["amp_range"], *t["phase_range"], *t["x_range"])
        self.cfg = cfg

    def train_batch(self, n: int, generator: torch.Generator) -> list[Task]:
        t = self.cfg["task"]
        return self.family.sample(n, t["train_points"], generator, num_query=t["query_points"])

    def train_share(self, n: int, generator: torch.Generator, part: slice) -> TaskShare:
        """Tasks ``part`` of the minibatch ``train_batch(n, generator)`` draws, built alone (same generator use)."""
        t = self.cfg["task"]
        tasks = self.family.sample(n, t["train_points"], generator, num_query=t["query_points"], part=part)
        return TaskShare.uniform(tasks, n, part, t["train_points"], t["query_points"])

    def eval_sets(self, split: str) -> dict[str, list[Task]]:
        e = self.cfg["eval"]
        seed = e["seed"] if split == "test" else e["val_seed"]
        out = {}
        for shots in e["shots"]:
            g = torch.Generator().manual_seed(seed * 1000 + shots)
            out[f"{shots}-shot"] = self.family.test_tasks(e["tasks"], shots, g, e["points"])
        return out


def _fewshot(cfg: dict[str, Any]) -> Any:
    from metaprox.tasks.fewshot import FewShotTasks

    return FewShotTasks(cfg)


FAMILIES: dict[str, Callable[[dict[str, Any]], Any]] = {"sine": SineTasks, "fewshot": _fewshot}

_IMAGE_SHAPES = {"omniglot": (1, 28), "miniimagenet": (3, 84), "tieredimagenet": (3, 84), "cifar_fs": (3, 32),
                 "fc100": (3, 32)}


def build_model(cfg: dict[str, Any]) -> nn.Module:
    m = cfg["model"]
    if m["cosine_scale"] and m["kind"] != "conv4":
        raise ConfigError(f"model.cosine_scale applies to model.kind = 'conv4' only, not {m['kind']!r}; "
                          f"remove it or set it to 0.")
    if cfg["heads"]["ways"]:
        return _shared_trunk(cfg)
    if m["kind"] == "mlp":
        return MLP(m["sizes"], m["activation"])
    if m["kind"] == "conv4":
        if cfg["task"]["family"] != "fewshot":
            raise ConfigError("model.kind = 'conv4' needs task.family = 'fewshot' (image episodes).")
        return _conv4(cfg, int(cfg["task"]["ways"]))
    if m["kind"] == "resnet12":
        from metaprox.models.resnet12 import ResNet12

        if cfg["task"]["family"] != "fewshot":
            raise ConfigError("model.kind = 'resnet12' needs task.family = 'fewshot' (image episodes).")
        channels, _ = _IMAGE_SHAPES.get(cfg["task"]["dataset"], (3, 84))
        return ResNet12(channels, int(cfg["task"]["ways"]), m["widths"], bn=m["bn"],
                        channels_last=bool(m["channels_last"]))
    raise ConfigError(f"unknown model.kind {m['kind']!r}; available: ['mlp', 'conv4', 'resnet12'].")


def _conv4(cfg: dict[str, Any], num_classes: int) -> Any:  # a Conv4 (imported lazily)
    """The config's Conv-4 with ``num_classes`` outputs (0: no head, the features — a trunk)."""
    from metaprox.models.conv4 import Conv4

    m = cfg["model"]
    channels, size = _IMAGE_SHAPES.get(cfg["task"]["dataset"], (3, 84))
    return Conv4(channels, num_classes, int(m["filters"]), size, bn=m["bn"], channels_last=bool(m["channels_last"]),
                 cosine_scale=float(m["cosine_scale"]))


def _shared_trunk(cfg: dict[str, Any]) -> nn.Module:
    """``heads.ways``: a Conv-4 feature trunk shared by all kinds, one linear head per kind (its way)."""
    from metaprox.models.shared_trunk import SharedTrunk
    from metaprox.tasks.mixed_ways import kind_names

    trunk = _conv4(cfg, 0)
    width = trunk.filters * trunk.feature_side ** 2
    return SharedTrunk(trunk, {k: nn.Linear(width, w) for k, w in kind_names(cfg["heads"]["ways"]).items()})


def build_inner(cfg: dict[str, Any], steps: int | None = None, lr: float | None = None,
                batch_size: int | None = None) -> InnerSolver:
    """The inner solver of ``cfg``; ``steps``/``lr``/``batch_size`` override (test time: 0 = full batch)."""
    i = cfg["inner"]
    steps = i["steps"] if steps is None else steps
    lr = i["lr"] if lr is None else lr
    bs = (i["batch_size"] if batch_size is None else batch_size) or None
    if i["carry_moments"] and i["solver"] != "adam":
        raise ConfigError(f"inner.carry_moments = true needs inner.solver = 'adam', not {i['solver']!r}.")
    if i["solver"] == "sgd":
        return SGD(lr=lr, steps=steps, momentum=i["momentum"], batch_size=bs)
    if i["solver"] == "adam":
        return Adam(lr=lr, steps=steps, beta1=i["beta1"], batch_size=bs, carry_moments=i["carry_moments"])
    if i["solver"] == "exact_least_squares":
        return ExactLeastSquares()
    raise ConfigError(f"unknown inner.solver {i['solver']!r}; choose 'sgd', 'adam' or 'exact_least_squares'.")


def optimizer_factory(cfg: dict[str, Any]) -> Callable[..., torch.optim.Optimizer]:
    o = cfg["outer"]
    if o["optimizer"] == "sgd":
        return lambda p: torch.optim.SGD(p, lr=o["lr"])
    if o["optimizer"] == "adam":
        return lambda p: torch.optim.Adam(p, lr=o["lr"])
    raise ConfigError(f"unknown outer.optimizer {o['optimizer']!r}; choose 'sgd' or 'adam'.")


def build_learner(cfg: dict[str, Any], model: nn.Module | None = None) -> MetaLearner:
    if cfg["algorithm"] == "finite_mmp":
        raise ConfigError("a finite_mmp run's learner is build_finite's; it is trained by `metaprox train` "
                          "(metaprox.train) and scored by `metaprox eval DIR --split val|test` (metaprox.finite_eval).")
    if cfg["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg['algorithm']!r}; available: {sorted(ALGORITHMS)}.")
    if model is None:
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg)
    model = model.to(cfg["device"])
    loss = "cross_entropy" if cfg["task"]["family"] != "sine" else "mse"
    lam = cfg["prox"]["lam"]
    if cfg["heads"]["ways"]:  # one head per kind around a shared trunk (validated: mmp, conv4, fewshot)
        from metaprox.algorithms.multihead import MultiHeadMMP

        h = cfg["heads"]
        return MultiHeadMMP(model, loss, lam=lam, head_lam=float(h["head_lam"]), head_init=h["head_init"],  # type: ignore[arg-type]
                            inner=build_inner(cfg), meta_optimizer=optimizer_factory(cfg),
                            total_steps=cfg["outer"]["steps"], schedule=cfg["outer"]["schedule"],
                            execution=cfg["execution"], seed=cfg["seed"])
    if cfg["prox"]["robust_scale"] is not None:  # validated: one λ > 0, a task stream
        lam = RobustL2(lam, [n for n, _ in model.named_parameters()], scale=float(cfg["prox"]["robust_scale"]))
    learner = ALGORITHMS[cfg["algorithm"]](
        model, loss, lam=(None if lam == 0 else lam), inner=build_inner(cfg),
        meta_optimizer=optimizer_factory(cfg), total_steps=cfg["outer"]["steps"],
        schedule=cfg["outer"]["schedule"], execution=cfg["execution"], precision=cfg["precision"],
        seed=cfg["seed"], **rule_options(cfg, cfg["algorithm"]))
    if cfg["prior"]["kind"] == "tree":  # over the stream: each episode's node from task.group_by
        _attach_tree(cfg, learner)
    return learner


def _prior_groups(pr: dict[str, Any]) -> list[tuple[str, str]] | None:
    """``[[prior.groups]]`` as (pattern, kind) rules, or None: the tree holds every parameter (validate.py)."""
    return [(g["pattern"], g["kind"]) for g in pr["groups"]] or None


def _attach_tree(cfg: dict[str, Any], learner: MetaLearner) -> None:
    """A :class:`~metaprox.priors.TreePrior` on ``learner`` (its refusals, e.g. second-order MAML, as ConfigError)."""
    from metaprox.priors import TreePrior

    pr = cfg["prior"]
    try:
        TreePrior(learner, pr["lam_levels"], pr["group_lr"], None, _prior_groups(pr))
    except ValueError as e:
        raise ConfigError(f"prior.kind = 'tree' with algorithm = {cfg['algorithm']!r}: {e}") from e


def rule_options(cfg: dict[str, Any], algo: str) -> dict[str, Any]:
    """The ``[rule]`` options that rule ``algo`` takes (inner_data, first_order, cg_steps)."""
    rule = cfg["rule"]
    extra: dict[str, Any] = {}
    if algo in ("mmp", "reptile"):  # rules without a query-loss meta-gradient may solve on support ∪ query
        extra["inner_data"] = rule["inner_data"]
    elif rule["inner_data"] != "support":
        raise ConfigError(f"rule.inner_data = {rule['inner_data']!r} applies to mmp and reptile only; {algo} "
                          f"evaluates its meta-gradient on the query set, so its inner problem uses the support set.")
    if algo == "maml":
        extra["first_order"] = rule["first_order"]
    if algo == "imaml":
        extra["cg_steps"] = int(rule["cg_steps"])
    return extra


def build_family(cfg: dict[str, Any]) -> Any:
    fam = cfg["task"]["family"]
    if cfg["heads"]["ways"] and fam == "fewshot":
        from metaprox.tasks.mixed_ways import MixedWayTasks

        return MixedWayTasks(cfg)
    if cfg["task"]["group_by"] is not None and fam == "fewshot":
        from metaprox.tasks.grouped import GroupedFewShotTasks

        return GroupedFewShotTasks(cfg)
    if fam not in FAMILIES:
        raise ConfigError(f"unknown task.family {fam!r}; available: {sorted(FAMILIES)}.")
    return FAMILIES[fam](cfg)


def _csv_rows(path: str, what: str) -> list[dict[str, str]]:
    import csv
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} = {path!r}: no such file.")
    with open(file, newline="") as f:
        return list(csv.DictReader(f))


def build_prior(cfg: dict[str, Any], num_tasks: int, weights: torch.Tensor) -> dict[str, Any]:
    """``{"prior": Tree | None, "graph": Graph | None}`` of ``cfg["prior"]`` for a finite set of ``num_tasks``
    tasks with weights w_t (the tree's node masses come from them)."""
    from metaprox.priors import Graph, Tree

    pr = cfg["prior"]
    if pr["kind"] == "tree":
        nodes = [str(n) for n in pr["task_nodes"]]
        if pr["nodes_csv"] is not None:
            if nodes:
                raise ConfigError("give prior.task_nodes or prior.nodes_csv, not both.")
            rows = _csv_rows(pr["nodes_csv"], "prior.nodes_csv")
            if rows and pr["nodes_column"] not in rows[0]:
                raise ConfigError(f"prior.nodes_csv {pr['nodes_csv']!r} has no column {pr['nodes_column']!r} "
                                  f"(columns: {list(rows[0])}); set prior.nodes_column.")
            nodes = [r[pr["nodes_column"]] for r in rows]
        if len(nodes) != num_tasks:
            raise ConfigError(f"prior.kind = 'tree' needs one node per task: got {len(nodes)} nodes for "
                              f"{num_tasks} tasks.")
        parent: dict[str, str | None] = {"root": None}
        for n in nodes:  # "a/b" is node "a/b" under "a" under the root
            parts = n.split("/")
            for d in range(len(parts)):
                parent.setdefault("/".join(parts[:d + 1]), "/".join(parts[:d]) or "root")
        try:
            return {"prior": Tree(parent, nodes, pr["lam_levels"], weights=weights, groups=_prior_groups(pr)),
                    "graph": None}
        except ValueError as e:
            raise ConfigError(f"prior (tree): {e}") from e
    if pr["kind"] == "graph":
        edges = [tuple(e) for e in pr["edges"]]
        if pr["edges_csv"] is not None:
            if edges:
                raise ConfigError("give prior.edges or prior.edges_csv, not both.")
            try:
                edges = [(int(r["t"]), int(r["s"]), float(r["weight"]))
                         for r in _csv_rows(pr["edges_csv"], "prior.edges_csv")]
            except (KeyError, ValueError) as e:
                raise ConfigError(f"prior.edges_csv {pr['edges_csv']!r}: need integer columns t, s and a number "
                                  f"column weight ({e}).") from e
        if any(len(e) != 3 for e in edges):
            raise ConfigError("prior.edges: each edge is [t, s, λ_ts].")
        try:
            return {"prior": None, "graph": Graph(num_tasks, edges)}
        except ValueError as e:
            raise ConfigError(f"prior (graph): {e}") from e
    return {"prior": None, "graph": None}


def finite_model(cfg: dict[str, Any], features: int, outputs: int) -> nn.Module:
    """The model of a finite task set (``model.kind`` linear, zero-initialised, or mlp), in float64."""
    kind = cfg["model"]["kind"]
    if kind == "linear":
        model = nn.Linear(features, outputs)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model.to(torch.float64)
    if kind == "mlp":
        sizes = [features, *cfg["model"]["sizes"][1:-1], outputs]
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[cfg["model"]["activation"]]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1])] + ([act()] if i < len(sizes) - 2 else [])
        torch.manual_seed(cfg["seed"])
        return nn.Sequential(*layers).to(torch.float64)
    raise ConfigError(f"model.kind = {kind!r} for a multitask run: use 'linear' or 'mlp'.")


def finite_lam(cfg: dict[str, Any]) -> Any:
    """``prox.lam`` of a finite run: one λ, or a table {glob: λ | "shared" | "private"}."""
    lam = cfg["prox"]["lam"]
    return dict(lam) if isinstance(lam, dict) else float(lam)


def finite_sampler(cfg: dict[str, Any], num_tasks: int) -> TaskSampler:
    """The task minibatches of a finite run: ``finite.sample`` over ``num_tasks`` (``outer.meta_batch`` each)."""
    sample = cfg["finite"]["sample"]
    batch = None if sample == "all" else cfg["outer"]["meta_batch"]
    return TaskSampler(num_tasks, batch, replacement=sample == "with_replacement", seed=cfg["seed"])


def build_finite(cfg: dict[str, Any], train: list[Task], fd: FiniteData, store: Any = None) -> Any:
    """The config's learner on the training tasks (``store``: the run's shard; None: in memory): FiniteMMP
    (``finite.rule = "mmp"``), or the rule's learner with a :class:`~metaprox.memory.TaskMemory`."""
    f, o = cfg["finite"], cfg["outer"]
    if cfg["precision"] != "fp32":
        raise ConfigError(f"precision = {cfg['precision']!r}: finite_mmp has no reduced-precision path (its "
                          f"linear and MLP models compute in float64); remove the precision setting.")
    sampler = finite_sampler(cfg, len(train))
    torch.manual_seed(cfg["seed"])
    model = finite_model(cfg, train[0].x.shape[1], fd.outputs)
    tasks = TaskSet(train)
    if f["rule"] != "mmp":
        lam = cfg["prox"]["lam"]
        learner = ALGORITHMS[f["rule"]](
            model, "cross_entropy" if fd.classify else "mse", lam=None if lam == 0 else finite_lam(cfg),
            inner=build_inner(cfg), meta_optimizer=optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"],
            schedule=o["schedule"], execution=cfg["execution"], seed=cfg["seed"], **rule_options(cfg, f["rule"]))
        try:
            TaskMemory(learner, tasks, store=store, sampler=sampler, task_lam=f["task_lam"])
        except ValueError as e:
            raise ConfigError(f"finite.rule = {f['rule']!r}: {e}") from e
        return learner
    center = "fixed" if f["center_update"] == "solve" else f["center_update"]  # solve: set once, then kept
    return FiniteMMP(model, tasks, "cross_entropy" if fd.classify else "mse", lam=finite_lam(cfg),
                     **build_prior(cfg, len(tasks), tasks.weights), task_lam=f["task_lam"], inner=build_inner(cfg),
                     store=store, center_update=center,
                     sampler=sampler, meta_optimizer=optimizer_factory(cfg), outer_lr=o["lr"], total_steps=o["steps"],
                     schedule=o["schedule"], execution=cfg["execution"], seed=cfg["seed"])
