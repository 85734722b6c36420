"""Which rule × prior × pull × memory combinations work, and why the others are refused — computed, not written.

Each part declares what it needs or offers (below); :func:`refusal` checks a combination and names the reason,
the learners' constructors call it (:func:`refuse`), and ``docs/composition.md`` is :func:`support_matrix` run
over every combination (a test regenerates and compares it).

- rule: ``differentiates_solve`` (second-order MAML unrolls the inner steps from one center w), ``needs_prox``
  (MMP, iMAML: the meta-gradient is defined by the pull), ``starts_at_center`` (Reptile, FOMAML, MAML are
  defined by a trajectory from the center: a memory keeps their v_t but does not warm-start them);
- prior: ``per_task_centers`` (a tree gives each task its node), ``needs_memory`` (a graph over tasks pulls
  toward the neighbours' stored v_s), ``needs_squared_pull`` (a graph folds its neighbours into one squared-ℓ2
  center; exact tree sweeps are λ-weighted means);
- pull: ``squared`` (ℓ2, per group or per task) or robust; ``shared`` groups need a rule that trains them jointly;
- memory: ``persistent`` (in-memory, memory-mapped, rank-sharded) or none (the infinite stream).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RULES", "PRIORS", "PULLS", "MEMORIES", "refusal", "refuse", "support_matrix"]

RULES = ("mmp", "reptile", "fomaml", "maml", "imaml")
PRIORS = ("flat", "tree", "graph")
PULLS = ("l2", "per_group", "per_task", "robust", "none")
MEMORIES = ("none", "memory", "memmap", "sharded")

#: second-order MAML differentiates through the unrolled solve from one center
DIFFERENTIATES_SOLVE = {"maml"}
#: the meta-gradient is defined by the pull (λ(c − v); (I + H/λ)⁻¹)
NEEDS_PROX = {"mmp", "imaml"}
#: the learners that exist for a persistent memory today (FiniteMMP, FiniteMultiHeadMMP)
FINITE_RULES = {"mmp"}


def refusal(rule: str, prior: str = "flat", pull: str = "l2", memory: str = "none") -> str | None:
    """Why ``rule × prior × pull × memory`` is refused, or None when it works."""
    for what, value, allowed in (("rule", rule, RULES), ("prior", prior, PRIORS), ("pull", pull, PULLS),
                                 ("memory", memory, MEMORIES)):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}.")
    if pull == "none" and rule in NEEDS_PROX:
        return f"{rule}'s meta-gradient is defined by the pull λ: give λ > 0"
    if rule in DIFFERENTIATES_SOLVE and prior != "flat":
        return ("second-order MAML differentiates through the unrolled solve from the one center w; a "
                f"{prior} prior gives each task its own center: use first_order=True (FOMAML)")
    if prior == "graph" and memory == "none":
        return "a graph over tasks pulls toward the neighbours' stored v_s: it needs a persistent memory"
    if prior == "graph" and pull not in ("l2", "per_group", "per_task"):
        return ("a graph folds the neighbours into one squared-ℓ2 center (squared edge terms in J): it needs a "
                "squared-ℓ2 pull")
    if memory != "none" and rule not in FINITE_RULES:
        return (f"a persistent memory (finite task set) runs through FiniteMMP, whose center update is MMP's "
                f"envelope step; {rule} on a finite set is not built yet")
    if prior == "tree" and memory != "none" and pull == "robust":
        return ("a finite tree is updated by exact sweeps (λ-weighted means): it needs a squared-ℓ2 pull; use the "
                "infinite-stream tree (HierarchicalMMP) with a robust pull")
    if pull == "per_task" and memory == "none":
        return "per-task pulls λ_t need named tasks (a finite set): use a persistent memory"
    return None


def refuse(learner: Any, *, prior: str = "flat", memory: str = "none") -> None:
    """Raise ``ValueError`` with the reason when ``learner``'s rule cannot run with ``prior`` and ``memory``."""
    rule = getattr(learner, "rule_name", None)
    if rule is None:
        return
    if rule == "maml" and getattr(learner, "first_order", False):
        rule = "fomaml"
    pull = "none" if not any(getattr(learner.prox, "lams", [])) else "l2"
    reason = refusal(rule, prior, pull, memory)
    if reason is not None:
        raise ValueError(f"{type(learner).__name__} with a {prior} prior and memory {memory!r} is refused: "
                         f"{reason}.")


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
