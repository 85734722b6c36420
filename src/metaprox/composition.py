"""Which rule × prior × pull × memory combinations work, and why the others are refused — computed, not written.

Each part declares what it needs or offers (below); :func:`refusal` checks a combination and names the reason,
the learners' constructors call it (:func:`refuse`), and ``docs/composition.md`` is :func:`support_matrix` run
over every combination (a test regenerates and compares it).

- rule: ``DIFFERENTIATES_SOLVE`` (second-order MAML unrolls the inner steps from one center w), ``NEEDS_PROX``
  (MMP, iMAML: the meta-gradient is defined by the pull), ``NEEDS_SQUARED`` (iMAML, MAML); a memory warm-starts
  only the rules whose inner problem has a unique solution (:data:`metaprox.memory.WARM_STARTED`);
- prior: a tree gives each task its node (squared-ℓ2 pulls); a graph over tasks pulls toward the neighbours'
  stored v_s (needs a memory and a squared-ℓ2 pull);
- pull: ``l2`` (one λ), ``per_group`` (λ per parameter group), ``per_task`` (λ_t = s_t·λ), ``robust``, ``none``;
- memory: ``none`` (the infinite stream), ``memory`` / ``memmap`` (a finite set's store), ``sharded``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RULES", "PRIORS", "PULLS", "MEMORIES", "refusal", "refuse", "support_matrix", "kinds_refusal"]

RULES = ("mmp", "reptile", "fomaml", "maml", "imaml")
PRIORS = ("flat", "tree", "graph")
PULLS = ("l2", "per_group", "per_task", "robust", "none")
MEMORIES = ("none", "memory", "memmap", "sharded")

#: second-order MAML differentiates through the unrolled solve from one center, with one λ per parameter
DIFFERENTIATES_SOLVE = {"maml"}
#: the meta-gradient is defined by the pull (λ(c − v); (I + H/λ)⁻¹)
NEEDS_PROX = {"mmp", "imaml"}
#: the meta-gradient assumes the squared-ℓ2 pull (iMAML's (H + Λ)⁻¹; MAML's unrolled λ(v − w) steps)
NEEDS_SQUARED = {"imaml", "maml"}


def refusal(rule: str, prior: str = "flat", pull: str = "l2", memory: str = "none") -> str | None:
    """Why ``rule × prior × pull × memory`` is refused, or None when it works.

    Where it runs: memory ``none`` — the rule's class (a ``tree`` prior: :class:`TreePrior` attached, e.g.
    :class:`HierarchicalMMP`); ``memory``/``memmap`` with the flat prior — the rule's class with a
    :class:`~metaprox.memory.TaskMemory`; a graph, a finite tree and ``sharded`` —
    :class:`~metaprox.algorithms.finite.FiniteMMP`.
    """
    for what, value, allowed in (("rule", rule, RULES), ("prior", prior, PRIORS), ("pull", pull, PULLS),
                                 ("memory", memory, MEMORIES)):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}.")
    if pull == "none" and rule in NEEDS_PROX:
        return f"{rule}'s meta-gradient is defined by the pull λ: give λ > 0"
    if pull == "robust" and rule in NEEDS_SQUARED:
        return (f"{rule}'s meta-gradient assumes the squared-ℓ2 pull ("
                + ("(H + Λ)⁻¹ of the implicit function theorem" if rule == "imaml" else "unrolled λ(v − w) steps")
                + "): use mmp, reptile or fomaml with a robust pull")
    if rule in DIFFERENTIATES_SOLVE and prior != "flat":
        return ("second-order MAML differentiates through the unrolled solve from the one center w; a "
                f"{prior} prior gives each task its own center: use first_order=True (FOMAML)")
    if rule in DIFFERENTIATES_SOLVE and pull == "per_task":
        return "second-order MAML unrolls with one λ per parameter: per-task pulls λ_t are not in its steps"
    if pull == "per_task" and memory == "none":
        return "per-task pulls λ_t need named tasks (a finite set): use a memory"
    if prior == "graph" and memory == "none":
        return "a graph over tasks pulls toward the neighbours' stored v_s: it needs a persistent memory"
    if prior == "graph" and pull in ("robust", "none"):
        return ("a graph folds the neighbours into one squared-ℓ2 center (squared edge terms in J): it needs a "
                "squared-ℓ2 pull")
    if prior == "tree" and pull == "robust":
        return ("a tree's pulls are squared ℓ2 (node sweeps are λ-weighted means; a new node's center is "
                "integrated out in closed form): use a squared-ℓ2 pull")
    if prior != "flat" and memory != "none" and rule != "mmp":
        return (f"a {prior} prior over a finite set runs through FiniteMMP (exact sweeps / Jacobi sweeps of MMP's "
                f"prox problems); {rule} there is not built")
    if memory == "sharded" and rule != "mmp":
        return ("rank-sharded stores run through FiniteMMP (each rank owns a block of tasks); TaskMemory is "
                "single-process: use memory 'memory' or 'memmap'")
    return None


def kinds_refusal(rule: str = "mmp", prior: str = "flat", center_update: str = "gradient",
                  world_size: int = 1, task_types: dict[str, str] | None = None) -> str | None:
    """Why a finite set whose tasks come in *kinds* (per-kind encoder and head around a shared trunk,
    :class:`~metaprox.algorithms.multihead.FiniteMultiHeadMMP`) cannot run with these settings, or None
    (``task_types``: kind → ``"regression"`` / ``"binary"`` / ``"multiclass"``)."""
    types = task_types or {}
    if len({t == "regression" for t in types.values()}) > 1:
        return (f"it mixes regression and classification kinds ({types}): the kinds share one trunk and one loss "
                f"(squared error or cross-entropy) in one joint objective; train them as separate runs")
    if rule != "mmp":
        return (f"a finite set of kinds runs through FiniteMultiHeadMMP (MMP's envelope step on the trunk); a "
                f"TaskMemory holds rows of one shape, so {rule} over kinds is not built: use finite.rule = 'mmp'")
    if prior != "flat":
        return (f"FiniteMultiHeadMMP pulls every kind's trunk toward one flat center w (heads and encoders are "
                f"private); a {prior} prior over tasks of different shapes is not built: use prior.kind = 'flat'")
    if center_update != "gradient":
        return (f"FiniteMultiHeadMMP moves its center by the envelope gradient step only ('{center_update}' "
                f"centers are FiniteMMP's); with one λ, finite.sample = 'all' and outer.lr = 1/λ that step puts "
                f"w at the weighted mean of the trunk rows, the exact update")
    if world_size > 1:
        return ("FiniteMultiHeadMMP keeps one store per kind in one process (no rank-sharded stores): run it "
                "without torchrun")
    return None


def refuse(learner: Any, *, prior: str = "flat", memory: str = "none", per_task: bool = False) -> None:
    """Raise ``ValueError`` with the reason when ``learner``'s rule and pull cannot run with ``prior`` and
    ``memory`` (``per_task``: the memory gives per-task pulls)."""
    from metaprox.prox import NoProx, RobustL2

    rule = getattr(learner, "rule_name", None)
    if rule is None:
        return
    if rule == "maml" and getattr(learner, "first_order", False):
        rule = "fomaml"
    prox = getattr(learner.prox, "base", learner.prox)
    pull = "none" if isinstance(prox, NoProx) else "robust" if isinstance(prox, RobustL2) else \
        "per_task" if per_task else "per_group" if getattr(prox, "uniform", None) is None else "l2"
    reason = refusal(rule, prior, pull, memory)
    if reason is not None:
        raise ValueError(f"{type(learner).__name__} ({rule}, {pull} pull) with a {prior} prior and memory "
                         f"{memory!r} is refused: {reason}.")


def support_matrix() -> str:
    """The markdown table of every combination: "works" or the refusal reason."""
    lines = ["| rule | prior | pull | memory | status |", "|---|---|---|---|---|"]
    for rule in RULES:
        for prior in PRIORS:
            for pull in PULLS:
                for memory in MEMORIES:
                    reason = refusal(rule, prior, pull, memory)
                    lines.append(f"| {rule} | {prior} | {pull} | {memory} | {reason or 'works'} |")
    return "\n".join(lines) + "\n"
