"""Test-time adaptation curves: adapt each test task from the learned prior, measure the query loss per step.

For a test task the same prox problem is solved as in training, by the same code path as
:meth:`MetaLearner.adapt` (:meth:`MetaLearner.adapt_tasks`): centred at the learned prior, starting from the
carried inner Adam moments when the solver carries them (test-time λ and solver may differ from training; the
head's center is w's or, with ``eval.head_init = "prototypes"``, the support set's class means), and
after 0, 1, …, k steps the query loss (and accuracy for classification) is recorded. Reports carry the mean,
the 95% confidence interval (1.96·sd/√n) and the number of tasks. BatchNorm backbones are evaluated under
``eval.bn``: the model's own protocol, ``"batch"`` (plain), ``"transductive"``, or ``"population"`` (statistics
of the training classes, :mod:`metaprox.population_bn`), and image backbones see each image as it is or, with
``eval.views = "flip"``, averaged with its mirror image (:mod:`metaprox.test_views`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaprox.algorithms.base import MetaLearner
from metaprox.head_init import using_head_init
from metaprox.population_bn import population_bn, training_images
from metaprox.solvers import InnerSolver
from metaprox.tasks.task import Task
from metaprox.test_views import using_views

__all__ = ["AdaptationCurve", "adaptation_curve", "mean_ci", "evaluate_run", "PeriodicValidation", "bn_protocol",
           "bn_for_evaluation", "population_images", "evaluation_protocol", "eval_table"]


@contextmanager
def bn_protocol(module: torch.nn.Module, bn: str) -> Iterator[str]:
    """Within the block the model predicts with the test-time BatchNorm protocol ``bn`` ("" keeps its own).

    Only ``"batch"`` (plain: each query example normalised together with the support set) and ``"transductive"``
    (the query batch's own statistics) are interchangeable: both train alike, with batch statistics. Yields the
    protocol in effect (``""`` for a model without one).
    """
    own = getattr(module, "bn", "")
    if not bn or bn == own:
        yield own
        return
    if own not in ("batch", "transductive"):
        from metaprox.config import ConfigError

        raise ConfigError(f"eval.bn = {bn!r} needs a model trained with batch statistics (model.bn = 'batch' or "
                          f"'transductive'); this one has model.bn = {own!r}.")
    model: Any = module  # its ``bn`` is a plain str attribute (nn.Module's __setattr__ is typed for tensors/modules)
    model.bn = bn
    try:
        yield bn
    finally:
        model.bn = own


def bn_for_evaluation(learner: MetaLearner, bn: str, population: tuple[torch.Tensor, float] | None
                      ) -> contextlib.AbstractContextManager[str]:
    """The test-time BatchNorm protocol ``bn`` for ``learner``: :func:`bn_protocol`, or for ``"population"``
    :func:`metaprox.population_bn.population_bn` on ``population`` = (training images, scale)."""
    if bn != "population":
        return bn_protocol(learner.fmodel.module, bn)
    if population is None:
        raise ValueError("eval.bn = 'population' needs training images (metaprox.population_bn.training_images).")
    return population_bn(learner, *population)


def population_images(e: dict[str, Any], family: Any) -> tuple[torch.Tensor, float] | None:
    """The training images of ``eval.bn = "population"`` (None for any other protocol)."""
    return training_images(family, int(e["bn_images"]), int(e["val_seed"])) if e["bn"] == "population" else None


@contextmanager
def evaluation_protocol(learner: MetaLearner, e: dict[str, Any], population: tuple[torch.Tensor, float] | None
                       ) -> Iterator[str]:
    """Within the block ``learner`` evaluates under the config's ``eval`` section ``e``: its BatchNorm protocol
    (:func:`bn_for_evaluation`, ``population`` from :func:`population_images`), head init and views; all are
    restored after. Yields the BatchNorm protocol in effect."""
    with bn_for_evaluation(learner, e["bn"], population) as bn, using_head_init(learner, e["head_init"]), \
            using_views(learner, e["views"]):
        yield bn


def mean_ci(values: torch.Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation) of per-task values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel())


@dataclass
class AdaptationCurve:
    """Per-task query loss (and accuracy) after each step: tensors of shape (steps + 1, num_tasks)."""

    loss: torch.Tensor
    accuracy: torch.Tensor | None

    @classmethod
    def concat(cls, parts: Sequence[AdaptationCurve]) -> AdaptationCurve:
        """One curve over the tasks of several (parts of one evaluation set, in order)."""
        acc = [c.accuracy for c in parts if c.accuracy is not None]
        return cls(torch.cat([c.loss for c in parts], 1), torch.cat(acc, 1) if len(acc) == len(parts) else None)

    @property
    def num_tasks(self) -> int:
        return int(self.loss.shape[1])

    def summary(self, steps: Sequence[int]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for s in steps:
            if s >= self.loss.shape[0]:
                raise ValueError(f"curve has {self.loss.shape[0] - 1} steps, asked for step {s}.")
            m, ci = mean_ci(self.loss[s])
            row = {"loss": m, "loss_ci95": ci, "tasks": float(self.num_tasks)}
            if self.accuracy is not None:
                am, aci = mean_ci(self.accuracy[s])
                row.update(accuracy=am, accuracy_ci95=aci)
            out[str(s)] = row
        return out


def adaptation_curve(learner: MetaLearner, tasks: Sequence[Task], steps: int, *, lam: float | None = None,
                     inner: InnerSolver | None = None, record: Sequence[int] | None = None,
                     where: Any = None) -> AdaptationCurve:
    """Adapt every task (support set) for ``steps`` steps from the learned prior; query loss after each step.

    The tasks are solved by :meth:`MetaLearner.adapt_tasks` — the same path as :meth:`MetaLearner.adapt`
    (carried Adam moments, a tree's nodes via ``where``, the learner's ``test_head_init``), so step ``steps`` of
    the curve is what ``adapt`` returns. ``record`` limits the evaluation to those step counts (others are NaN) —
    useful when predicting is costly. A model that defines ``predict(x_support, x_query, params)`` (e.g.
    :class:`~metaprox.models.Conv4`, whose BatchNorm test protocol needs the support set) is evaluated through
    it, one task at a time.
    """
    if any(not t.has_query for t in tasks):
        raise ValueError("adaptation_curve needs test tasks with a query set (Task(x, y, x_query, y_query)).")
    n = len(tasks)
    wanted = set(range(steps + 1)) if record is None else {int(k) for k in record}
    loss = torch.full((steps + 1, n), float("nan"), dtype=torch.float64)
    acc = torch.full((steps + 1, n), float("nan"), dtype=torch.float64) if learner.loss.name == "cross_entropy" \
        else None
    module = learner.fmodel.module
    module_predict: Any = getattr(module, "predict", None)  # a model's own predict(x, x_query, params), if any
    # multi-head: each kind's member model predicts through its oracle (the trunk alone has no head)
    own_predict = callable(module_predict) and not getattr(learner, "kinds", None)

    def on_group(idx: Any, x: torch.Tensor, oracle: Any) -> Any:
        xq, yq = learner.execution.stack([tasks[i] for i in idx], query=True)
        cols = torch.as_tensor(idx)

        def record_step(k: int, v: list[torch.Tensor]) -> None:
            if k not in wanted:
                return
            with torch.no_grad():
                if own_predict:
                    named = dict(zip(learner.names, v, strict=True))
                    pred = torch.stack([module_predict(x[b], xq[b], {nm: t[b] for nm, t in named.items()})
                                        for b in range(len(x))])
                else:
                    pred = oracle.predict(v, xq)
                loss[k, cols] = learner.loss.batched(pred, yq).double().cpu()
                if acc is not None:
                    acc[k, cols] = (pred.argmax(-1) == yq).double().flatten(1).mean(1).cpu()
        return record_step

    learner.adapt_tasks(tasks, steps, lam, inner, where=where, on_group=on_group)
    return AdaptationCurve(loss, acc)


def set_kinds(learner: MetaLearner, set_name: str, tasks: Sequence[Task]) -> list[str] | None:
    """Where each task sits: its kind when ``learner`` has one head per kind (the evaluation sets are named by
    kind), its node when it has a tree prior (a family's GroupedTasks; else None: every task at the root), else
    None."""
    if getattr(learner, "kinds", None):
        return [set_name] * len(tasks)
    if learner.hierarchy is not None:
        return getattr(tasks, "groups", None)
    return None


def eval_table(result: dict[str, Any]) -> str:
    steps = result["steps"]
    metric = "accuracy" if result["metric"] == "accuracy" else "loss"
    name = "accuracy (%)" if metric == "accuracy" else "MSE"
    head = "| set | " + " | ".join(f"{name} after {s} steps" for s in steps) + " | tasks |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    for set_name, rows in result["sets"].items():
        scale = 100.0 if metric == "accuracy" else 1.0
        cells = [f"{rows[str(s)][metric] * scale:.3f} ± {rows[str(s)][metric + '_ci95'] * scale:.3f}" for s in steps]
        how = result.get("test_time", {})
        bn = how.get("bn")
        label = f"{set_name} ({'plain' if bn == 'batch' else bn} BN)" if bn else set_name
        if how.get("head_init", "prior") != "prior":
            label += f", head from {how['head_init']}"
        if how.get("views", "image") != "image":
            label += f", {how['views']} views"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {int(rows[str(steps[0])]['tasks'])} |")
    return "\n".join(lines) + "\n"


EVAL_PART = 50  # episodes adapted at once by evaluate_run (when the family builds parts alone): 250 5-shot
# miniImageNet episodes at once (6,250 support images, ~5.6 GB per conv layer output) were OOM-killed too


def evaluate_run(run_dir: str | Path, split: str = "test", learner: MetaLearner | None = None,
                 cfg: dict[str, Any] | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate a run's learned prior on its evaluation sets; writes ``eval.json``/``eval.md`` (``eval-val.*``).

    Test-time adaptation uses ``eval.lam`` / ``eval.lr`` when set, else the training λ and inner lr, and the head
    init ``eval.head_init``; the curve runs to the largest of ``eval.steps`` and is reported at each of them, with
    95% CIs over the tasks. Files of a protocol other than the defaults carry it in their name
    (``eval-val-bn_transductive-head_prototypes.json``, ``eval-bn_population-head_prototypes-views_flip.json``).
    """
    from metaprox.build import build_family, build_inner
    from metaprox.checkpoint import atomic_write
    from metaprox.rundir import load_learner

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}.")
    run_dir = Path(run_dir)
    if learner is None or cfg is None:
        learner, cfg, _ = load_learner(run_dir)
    e = cfg["eval"]
    steps = sorted(set(e["steps"]))
    inner = build_inner(cfg, lr=e["lr"], batch_size=e["batch_size"])
    sets: dict[str, dict[str, Any]] = {}
    family = build_family(cfg)
    # a family that builds parts of its episodes alone is adapted EVAL_PART episodes at a time: 2,000
    # miniImageNet 5-way episodes with 15 queries per class at once are 13.5 GB of float32 images
    # (half as many with flip views: each image passes the trunk twice, 17 GB for 50 5-shot episodes, 8 steps)
    per_part = EVAL_PART // 2 if e["views"] == "flip" else EVAL_PART
    parts: list[slice | None] = [None]
    if getattr(family, "builds_parts", False) and e["tasks"] > per_part:
        parts = [slice(lo, min(lo + per_part, e["tasks"])) for lo in range(0, e["tasks"], per_part)]
    record = None if learner.loss.name == "mse" else steps  # classification: predict only where reported
    with evaluation_protocol(learner, e, population_images(e, family)) as bn:
        curves: dict[str, list[AdaptationCurve]] = {}
        for part in parts:
            for set_name, tasks in (family.eval_sets(split) if part is None else
                                    family.eval_sets(split, part=part)).items():
                curves.setdefault(set_name, []).append(
                    adaptation_curve(learner, tasks, max(steps), lam=e["lam"], inner=inner, record=record,
                                     where=set_kinds(learner, set_name, tasks)))
        for set_name, pieces in curves.items():
            curve = AdaptationCurve.concat(pieces)
            sets[set_name] = curve.summary(steps)
            sets[set_name]["curve"] = [float(v) for v in curve.loss.mean(1)]
            if curve.accuracy is not None:
                sets[set_name]["accuracy_curve"] = [float(v) for v in curve.accuracy.mean(1)]
    lam = e["lam"] if e["lam"] is not None else cfg["prox"]["lam"]
    result = {"split": split, "step": learner.step_count, "steps": steps,
              "metric": "accuracy" if learner.loss.name == "cross_entropy" else "mse",
              "test_time": {"lam": lam, "lr": inner.__dict__.get("lr"), "solver": cfg["inner"]["solver"],
                            "head_init": e["head_init"], **({"bn": bn} if bn else {}),
                            **({"views": e["views"]} if e["views"] != "image" else {})},
              "sets": sets}
    if write:
        stem = ("eval" if split == "test" else "eval-val") + (f"-bn_{e['bn']}" if e["bn"] else "") + \
            (f"-head_{e['head_init']}" if e["head_init"] != "prior" else "") + \
            (f"-views_{e['views']}" if e["views"] != "image" else "")
        atomic_write(run_dir / f"{stem}.json", json.dumps(result, indent=1))
        atomic_write(run_dir / f"{stem}.md", eval_table(result))
    return result


class PeriodicValidation:
    """Cheap validation during training (``log.eval_every``): mean query loss (and accuracy) on
    ``log.eval_tasks`` validation tasks per shot setting, after each of ``eval.steps`` test-time steps (same
    test-time λ, lr, BatchNorm protocol, head init and views as :func:`evaluate_run`). The tasks are drawn once, with
    ``eval.val_seed`` (never test tasks).

    The learner's generator is restored afterwards, so training is bitwise the same with or without it.
    """

    def __init__(self, cfg: dict[str, Any]):
        from metaprox.build import build_family, build_inner

        e = cfg["eval"]
        small = {**cfg, "eval": {**e, "tasks": cfg["log"]["eval_tasks"]}}
        family = build_family(small)
        self.sets = family.eval_sets("val")
        self.steps = sorted(set(e["steps"]))
        self.lam = e["lam"]
        self.inner = build_inner(cfg, lr=e["lr"], batch_size=e["batch_size"])  # as evaluate_run adapts
        self.protocol = e  # its BatchNorm protocol, head init and views (evaluation_protocol)
        self.population = population_images(e, family)  # the training split, loaded once with the sets

    def __call__(self, learner: MetaLearner) -> dict[str, dict[str, dict[str, float]]]:
        """``{"sets": {set: {step: mean query loss}}}``, plus ``"accuracy"`` (same shape) for classification."""
        state = learner.generator.get_state()
        try:
            losses, accuracy = {}, {}
            record = None if learner.loss.name == "mse" else self.steps  # classification: predict only where logged
            with evaluation_protocol(learner, self.protocol, self.population):
                for name, tasks in self.sets.items():
                    curve = adaptation_curve(learner, tasks, max(self.steps), lam=self.lam, inner=self.inner,
                                             record=record, where=set_kinds(learner, name, tasks))
                    losses[name] = {str(s): float(curve.loss[s].mean()) for s in self.steps}
                    if curve.accuracy is not None:
                        accuracy[name] = {str(s): float(curve.accuracy[s].mean()) for s in self.steps}
            return {"sets": losses, **({"accuracy": accuracy} if accuracy else {})}
        finally:
            learner.generator.set_state(state)
