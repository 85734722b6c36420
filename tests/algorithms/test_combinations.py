"""Every rule × prior × pull × memory of :mod:`metaprox.composition`, built by one factory on the same small tasks.

The parameter lists are generated from ``refusal()``: each combination it says works is built (:func:`build`) and
runs the checks below; each one it refuses must be refused at construction, with that reason (so
docs/composition.md, which is ``support_matrix()``, and the behaviour cannot drift apart).

Checks: strategy agreement (batched = vmap = loop), checkpoint → resume bitwise, memory flat in the inner steps
(first-order rules), 2 gloo ranks = 1 process (a representative subset), and the closed forms: the finite joint
optimum (flat, tree, graph; the tree prior over the task stream too) from its normal equations, and Reptile's
fixed point on a finite quadratic set.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import SavedTensorPeak
from safetensors.torch import load_file, save_file

import metaprox
from _spawn_helpers import spawn_gloo
from conftest import quad_terms
from metaprox import sharded
from metaprox.algorithms.finite import FiniteMMP
from metaprox.checkpoint import load_checkpoint, save_checkpoint
from metaprox.composition import MEMORIES, PRIORS, PULLS, RULES, refusal
from metaprox.memory import TaskMemory
from metaprox.priors import Graph, Tree, TreePrior
from metaprox.prox import RobustL2
from metaprox.store import ShardedStore
from metaprox.tasks.taskset import TaskSampler, TaskSet

COMBOS = list(itertools.product(RULES, PRIORS, PULLS, MEMORIES))
WORKS = [c for c in COMBOS if refusal(*c) is None]
REFUSED = [c for c in COMBOS if refusal(*c) is not None]

DT = torch.float64
D = 3                                        # features of Linear(3, 1)
P = D + 1                                    # a task's parameters, flat: [weight, bias]
SIZES = (6, 9, 6, 9, 6, 9)                   # two shapes: the tasks are solved in two stacked groups
WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.5], dtype=DT)
N = len(SIZES)
NODE = ["a", "a", "b", "b", "a", "b"]        # each task's node of the two-level tree root → {a, b}
LAM_LEVEL = 0.8                              # pull of a node toward the root
EDGES = [(0, 1, 1.0), (2, 3, 0.5), (1, 4, 0.8), (3, 5, 1.2)]
GROUP_LAM = {"weight": 1.0, "bias": 2.5}     # the per_group pull
BATCH = 4                                    # tasks per outer step (None: all of them)


def tasks() -> list[metaprox.Task]:
    """Least-squares tasks around a common linear map, each with a query set (the query-loss rules need one)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(D, 1, generator=g, dtype=DT)
    out = []
    for i, n in enumerate(SIZES):
        w = base + 0.6 * torch.randn(D, 1, generator=g, dtype=DT)
        x, xq = torch.randn(n, D, generator=g, dtype=DT), torch.randn(5, D, generator=g, dtype=DT)
        noise = 0.1 * torch.randn(n + 5, 1, generator=g, dtype=DT)
        out.append(metaprox.Task(x, x @ w + 0.2 * i + noise[:n], xq, xq @ w + 0.2 * i + noise[n:]))
    return out


TASKS = tasks()


def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Linear(D, 1).to(DT)


NAMES = ["weight", "bias"]
RULE_CLASS = {"mmp": metaprox.MetaMinibatchProx, "reptile": metaprox.Reptile, "fomaml": metaprox.FOMAML,
              "maml": metaprox.MAML, "imaml": metaprox.IMAML}
RULE_KW: dict[str, dict[str, Any]] = {"imaml": {"cg_steps": 4}}


def penalty(pull: str) -> Any:
    """The ``lam`` argument that gives ``pull`` (per_task: one λ, scaled per task by the memory's task_lam)."""
    return {"l2": 1.0, "per_group": GROUP_LAM, "per_task": 1.0, "robust": RobustL2(1.0, NAMES),
            "none": None}[pull]


def not_expressible(rule: str, prior: str, pull: str, memory: str) -> str | None:
    """Why no constructor takes these parts together (nothing to build, nor to refuse), or None."""
    if prior == "graph" and (rule != "mmp" or memory == "none"):
        return "a Graph is an argument of FiniteMMP only (MMP over a finite set)"
    if pull == "per_task" and memory == "none":
        return "per-task pulls come from a TaskSet (task_lam): there is no task set without a memory"
    return None


@dataclass
class Built:
    learner: Any
    prior: str
    memory: str
    batch: int | None

    def step(self, monitor: bool = True) -> dict[str, float]:
        """One outer step: a memory draws its tasks (sampler); the task stream's minibatch follows the step count
        (so a resumed learner sees the same tasks as one that never stopped)."""
        if self.memory != "none":
            return self.learner.step(monitor=monitor)
        b = N if self.batch is None else self.batch
        idx = [(self.learner.step_count * b + k) % N for k in range(b)]
        where = [NODE[i] for i in idx] if self.prior == "tree" else None
        return self.learner.step([TASKS[i] for i in idx], weights=WEIGHTS[idx], where=where, monitor=monitor)

    @property
    def keeper(self) -> Any:
        """What holds the finite set's store and sampler: the task memory, or FiniteMMP itself."""
        return self.learner.memory if self.learner.memory is not None else self.learner

    def state(self) -> dict[str, torch.Tensor]:
        """Everything a step changes: the center, the prior's nodes, every stored v_t (and whether it was set)."""
        ln = self.learner
        out = {f"w/{n}": p.detach().clone() for n, p in zip(ln.names, ln.fmodel.params(), strict=True)}
        if ln.hierarchy is not None:
            out.update({f"node/{k}": t for k, t in ln.hierarchy.state_dict().items()})
        if getattr(ln, "theta", None) is not None:
            out["theta"] = ln.theta.clone()
        if self.memory != "none":
            store = self.keeper.store
            ids = np.arange(store.lo, store.hi) if isinstance(store, ShardedStore) else np.arange(N)
            rows, seen = store.read(ids, torch.zeros(P, dtype=DT))
            out.update({"rows": rows.to(DT), "seen": seen})
        return out


def build(rule: str, prior: str, pull: str, memory: str, root: Path, *, execution: str = "batched",
          inner: Any = None, batch: int | None = BATCH, reducer: Any = None, resume: bool = False,
          **outer: Any) -> Built:
    """The one way every combination is built: the rule's class with its pull; a tree over the task stream is a
    :class:`TreePrior` attached to it; a finite set is a :class:`TaskMemory` attached to it — except where
    ``composition.refusal``'s docstring sends a combination to :class:`FiniteMMP` (MMP with a tree or graph over
    a finite set, or with a rank-sharded store). Stores: ``memory`` in RAM; ``memmap`` and ``sharded`` the run
    directory's shard (:func:`metaprox.sharded.open_shard`, what ``metaprox train`` opens; in one process the
    whole set, under torchrun this rank's block; ``resume``: reopened at its checkpoint). ``reducer``:
    torch.distributed ranks (default: one process)."""
    why = not_expressible(rule, prior, pull, memory)
    if why:
        raise AssertionError(f"cannot build {(rule, prior, pull, memory)}: {why}")
    # a few inner steps on purpose (the checks are about the plumbing): no inexact-solve warnings
    kw = {"inner": inner or metaprox.SGD(lr=0.05, steps=3), "execution": execution, "schedule": "constant",
          "outer_lr": outer.pop("outer_lr", 0.3), "stationarity_warn_ratio": float("inf"), **outer}
    taskset = TaskSet(TASKS, weights=WEIGHTS)
    sampler = TaskSampler(N, batch, seed=3)
    task_lam = "size" if pull == "per_task" else "constant"
    store = None
    if memory in ("memmap", "sharded"):
        store = sharded.open_shard(root / "run", sharded.layout_of(model()), N, reducer, resume=resume)
    if rule == "mmp" and memory != "none" and (prior != "flat" or memory == "sharded"):
        tree = Tree({"root": None, "a": "root", "b": "root"}, NODE, [LAM_LEVEL], weights=WEIGHTS)
        # FiniteMMP reads a number or mapping as GroupL2, so no pull is the ready NoProx penalty
        learner = FiniteMMP(model(), taskset, lam=penalty(pull) if pull != "none" else metaprox.NoProx(NAMES),
                            task_lam=task_lam, store=store, sampler=sampler,
                            center_update="exact" if prior == "tree" else "gradient",
                            prior=tree if prior == "tree" else None,
                            graph=Graph(N, EDGES) if prior == "graph" else None, **kw)
    else:
        learner = RULE_CLASS[rule](model(), "mse", lam=penalty(pull), **RULE_KW.get(rule, {}), **kw)
        if prior == "tree":
            TreePrior(learner, [LAM_LEVEL])
        if memory != "none":
            TaskMemory(learner, taskset, store=store, sampler=sampler, task_lam=task_lam)
    if reducer is not None:
        learner.reducer = reducer
    return Built(learner, prior, memory, batch)


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The largest change of any state entry (a tree node new in ``after`` started at the root's center)."""
    def start(k: str) -> torch.Tensor:
        return before[k] if k in before else before["w/" + json.loads(k[len("node/"):])["param"]]
    return max(float((after[k].double() - start(k).double()).abs().max()) for k in after)


def combo_id(c: tuple[str, ...]) -> str:
    return "-".join(c)


# ----- the support matrix is the behaviour --------------------------------------------------------------------
class _RankZeroOfTwo:
    """Just enough of a reducer for ``open_shard`` to cut rank 0's block: a real shard, in one process."""
    rank, world_size = 0, 2


@pytest.mark.parametrize("combo", [c for c in REFUSED if not not_expressible(*c)], ids=combo_id)
def test_a_refused_combination_is_refused_at_construction_with_its_reason(combo, tmp_path):
    reason = refusal(*combo)
    # a rank-sharded store in one process: rank 0's block (a whole-set "shard" is a memmap store)
    reducer = _RankZeroOfTwo() if combo[3] == "sharded" else None
    with pytest.raises(ValueError) as refused:
        build(*combo, tmp_path, reducer=reducer)
    assert reason is not None and reason in str(refused.value)


def test_what_no_constructor_can_express_is_refused_by_the_matrix():
    unexpressible = [c for c in COMBOS if not_expressible(*c)]
    # a graph: 4 rules × 5 pulls × 4 memories, and MMP's 5 pulls without a memory; per_task without a memory:
    # 5 rules × flat/tree
    assert len(unexpressible) == 80 + 5 + 10
    assert all(refusal(*c) for c in unexpressible)


@pytest.mark.parametrize("combo", WORKS, ids=combo_id)
def test_strategies_agree(combo, tmp_path):
    """One outer step with every execution strategy: the same center, nodes and stored v_t to round-off."""
    got = {}
    for strategy in ("batched", "vmap", "loop"):
        b = build(*combo, tmp_path / strategy, execution=strategy)
        before = b.state()
        b.step()
        got[strategy] = b.state()
    assert moved(before, got["loop"]) > 1e-3  # the step did something
    for strategy in ("batched", "vmap"):
        for k, ref in got["loop"].items():
            torch.testing.assert_close(got[strategy][k], ref, rtol=1e-10, atol=1e-12, msg=f"{strategy} {k}")


# ----- checkpoint → resume ----------------------------------------------------------------------------------
def save(b: Built, root: Path) -> None:
    """The checkpoint ``metaprox train`` writes: the learner state (safetensors + JSON); with a store, the
    two-phase commit of the store shard and the state together (sampler included)."""
    if b.memory == "none":
        save_checkpoint(root / "run", b.learner.state_dict(), {})
    else:
        sharded.save(root / "run", b.learner)


def restore(b: Built, root: Path) -> None:
    if b.memory == "none":
        b.learner.load_state_dict(load_checkpoint(root / "run")[0])
    else:
        sharded.load(root / "run", b.learner)


def _resumable(c: tuple[str, ...]) -> Any:
    if c[3] == "memory":
        return pytest.param(c, marks=pytest.mark.skip(reason="a MemoryStore lives in RAM and has no checkpoint: "
                                                             "runs that resume keep v_t in a memmap/sharded store"))
    return c


K = 2  # steps before and after the checkpoint
# Adam's moments, inner minibatches (the learner's generator) and the sampler's epoch all cross the checkpoint
RESUME_KW = {"meta_optimizer": lambda p: torch.optim.Adam(p, lr=0.05)}


def resume_inner(rule: str) -> metaprox.SGD:
    # MAML differentiates through full-batch steps; every other rule draws inner minibatches
    return metaprox.SGD(lr=0.05, steps=3, batch_size=None if rule == "maml" else 4)


@pytest.mark.parametrize("combo", [_resumable(c) for c in WORKS], ids=combo_id)
def test_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(combo, tmp_path):
    straight = build(*combo, tmp_path / "straight", inner=resume_inner(combo[0]), **RESUME_KW)
    diags = [straight.step() for _ in range(2 * K)]
    cut = build(*combo, tmp_path / "cut", inner=resume_inner(combo[0]), **RESUME_KW)
    for _ in range(K):
        cut.step()
    save(cut, tmp_path / "cut")
    del cut
    resumed = build(*combo, tmp_path / "cut", inner=resume_inner(combo[0]), resume=True, **RESUME_KW)
    restore(resumed, tmp_path / "cut")
    assert resumed.learner.step_count == K
    resumed_diags = [resumed.step() for _ in range(K)]
    want, got = straight.state(), resumed.state()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert resumed_diags == diags[K:]


# ----- memory flat in the inner steps ---------------------------------------------------------------------
def saved_peak(combo: tuple[str, ...], steps: int, root: Path) -> int:
    """Peak bytes of tensors saved for backward alive at once during one outer step with ``steps`` inner steps."""
    b = build(*combo, root / str(steps), inner=metaprox.SGD(lr=0.05, steps=steps))
    with SavedTensorPeak() as tracker:
        b.step()
    assert tracker.live == 0  # every graph was freed
    return tracker.peak


@pytest.mark.parametrize("combo", WORKS, ids=combo_id)
def test_memory_is_flat_in_the_inner_steps_for_first_order_rules(combo, tmp_path):
    """Deterministic proxy for memory: the peak of autograd's saved tensors (execution 'batched'). Second-order
    MAML keeps the graph of every unrolled step, so there the peak must grow instead."""
    one, many = saved_peak(combo, 1, tmp_path), saved_peak(combo, 6, tmp_path)
    if combo[0] == "maml":
        assert many > 3 * one > 0
    else:
        assert one == many > 0


# ----- closed forms ---------------------------------------------------------------------------------------
SCALE = torch.tensor(SIZES, dtype=DT).mean() / torch.tensor(SIZES, dtype=DT)  # per_task "size": s_t = n̄/n_t


def lam_matrix(pull: str) -> torch.Tensor:
    """Λ: λ per entry (per_group: the bias has its own; none: no pull)."""
    lam = torch.tensor([1.0] * D + [GROUP_LAM["bias"] if pull == "per_group" else 1.0], dtype=DT)
    return torch.diag(lam) if pull != "none" else torch.zeros(P, P, dtype=DT)


def pull_matrix(pull: str, t: int) -> torch.Tensor:
    """s_t·Λ: task t's pull toward its center."""
    return (float(SCALE[t]) if pull == "per_task" else 1.0) * lam_matrix(pull)


def joint_optimum(prior: str, pull: str) -> torch.Tensor:
    """argmin of J = Σ_t w_t [L_t(v_t) + ½(v_t − c_t)ᵀ s_tΛ (v_t − c_t)] + Σ_nodes m_n λ_1/2 ‖θ_n − w‖²
    + Σ_edges λ_ts/2 (v_t − v_s)ᵀΛ(v_t − v_s) (c_t: w, or the task's node θ_n; m_n = Σ_{t at n} w_t) over
    z = (v_1..v_N, θ_a, θ_b, w): J is quadratic (L_t = ½vᵀA_tv − b_tᵀv + const), so z solves H z = g.
    Rows ``(N [+ 2] + 1, P)``: the tasks' v_t, the tree's nodes, then w."""
    nodes = ["a", "b"] if prior == "tree" else []
    blocks = N + len(nodes) + 1
    w_at = blocks - 1
    h = torch.zeros(blocks * P, blocks * P, dtype=DT)
    g = torch.zeros(blocks * P, dtype=DT)

    def at(i: int) -> slice:
        return slice(i * P, (i + 1) * P)

    def spring(i: int, j: int, k: torch.Tensor) -> None:  # ½(z_i − z_j)ᵀ k (z_i − z_j)
        h[at(i), at(i)] += k
        h[at(j), at(j)] += k
        h[at(i), at(j)] -= k
        h[at(j), at(i)] -= k

    for t, task in enumerate(TASKS):
        a, b = quad_terms(task)
        h[at(t), at(t)] += WEIGHTS[t] * a
        g[at(t)] += WEIGHTS[t] * b
        spring(t, N + nodes.index(NODE[t]) if nodes else w_at, WEIGHTS[t] * pull_matrix(pull, t))
    for k, n in enumerate(nodes):
        mass = float(sum(WEIGHTS[t] for t in range(N) if NODE[t] == n))
        spring(N + k, w_at, mass * LAM_LEVEL * torch.eye(P, dtype=DT))
    if prior == "graph":
        for t, s, e in EDGES:
            spring(t, s, e * lam_matrix(pull))
    return torch.linalg.solve(h, g).view(blocks, P)


def flat_center(learner: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in learner.fmodel.params()])


# MMP with exact inner solves, full batches: its fixed point is J's minimiser (a finite set, or the task stream
# repeating the whole weighted set); a robust pull is not quadratic (no closed form), MAML/FOMAML/iMAML/Reptile
# have other fixed points (Reptile's: below)
JOINT = [c for c in WORKS if c[0] == "mmp" and c[2] in ("l2", "per_group", "per_task")]


@pytest.mark.parametrize("combo", JOINT, ids=combo_id)
def test_mmp_reaches_the_joint_optimum_of_trees_and_graphs(combo, tmp_path):
    _, prior, pull, memory = combo
    b = build(*combo, tmp_path, inner=metaprox.ExactLeastSquares(), batch=None, outer_lr=1.0)
    # flat: gradient steps on w; tree: exact node sweeps (finite) or gradient steps on the nodes (task stream);
    # graph: a Jacobi sweep of the v_t per step
    for _ in range(200 if prior == "tree" and memory == "none" else {"flat": 40, "tree": 80, "graph": 60}[prior]):
        b.step(monitor=False)
    want = joint_optimum(prior, pull)
    # the memmap store keeps v_t in float32, and exact centers and graph neighbours are read from it
    tol = 1e-9 if memory in ("none", "memory") else 2e-6
    got, ref = {"w": flat_center(b.learner)}, {"w": want[-1]}
    if prior == "tree":
        ref.update({"a": want[N], "b": want[N + 1]})
    if prior == "tree" and memory == "none":
        got.update({n: torch.cat([t.flatten() for t in b.learner.hierarchy.nodes[(n,)]]) for n in "ab"})
    elif prior == "tree":
        got.update({n: b.learner.theta[b.learner.prior.index[n]] for n in "ab"})
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=tol, msg=k)
    if memory != "none":
        torch.testing.assert_close(b.state()["rows"], want[:N], rtol=0, atol=tol)


def reptile_fixed_point(pull: str, alpha: float, m: int) -> torch.Tensor:
    """Full-batch Reptile with M SGD steps of lr α on L_t + ½(v − w)ᵀs_tΛ(v − w) from w: with G_t = A_t + s_tΛ the
    steps contract toward G_t⁻¹(b_t + s_tΛw), so w − v_t = C_t G_t⁻¹ A_t (w − a_t), C_t = I − (I − αG_t)^M,
    a_t = A_t⁻¹b_t; the fixed point solves Σ_t q_t C_t G_t⁻¹ A_t (w − a_t) = 0 (q_t = w_t/W)."""
    lhs, rhs = torch.zeros(P, P, dtype=DT), torch.zeros(P, dtype=DT)
    eye = torch.eye(P, dtype=DT)
    for t, task in enumerate(TASKS):
        a, b = quad_terms(task)
        g = a + pull_matrix(pull, t)
        k = (eye - torch.linalg.matrix_power(eye - alpha * g, m)) @ torch.linalg.solve(g, a)
        lhs += WEIGHTS[t] * k
        rhs += WEIGHTS[t] * k @ torch.linalg.solve(a, b)
    return torch.linalg.solve(lhs, rhs)


# Reptile over the whole weighted set (a finite set's memory, or the stream repeating it); a robust pull is not
# quadratic; under a tree the nodes add their own pulls (not this fixed point)
REPTILE = [c for c in WORKS if c[0] == "reptile" and c[1] == "flat" and c[2] != "robust"]


@pytest.mark.parametrize("combo", REPTILE, ids=combo_id)
def test_reptile_reaches_its_fixed_point_on_a_finite_quadratic_set(combo, tmp_path):
    alpha, m = 0.2, 4
    # outer lr β = 1.5·αM: the paper's w ← w + ε(v̄ − w) with ε = 1.5, converged to round-off in ~40 steps
    b = build(*combo, tmp_path, inner=metaprox.SGD(lr=alpha, steps=m), batch=None, outer_lr=1.5 * alpha * m)
    for _ in range(50):
        b.step(monitor=False)
    # Reptile starts every task at w (no warm start), so a float32 store does not enter w
    torch.testing.assert_close(flat_center(b.learner), reptile_fixed_point(combo[2], alpha, m), rtol=0, atol=1e-9)


# ----- 2 gloo ranks = 1 process ---------------------------------------------------------------------------
# one case per prior, per memory that runs on several ranks (none: the task stream, each rank solving its share of
# every minibatch; sharded: each rank owning a block of the finite set — TaskMemory's memory/memmap stores are
# single-process, refused on several ranks), per pull and per rule
GLOO = [("mmp", "flat", "l2", "none"), ("fomaml", "tree", "per_group", "none"), ("maml", "flat", "per_group", "none"),
        ("imaml", "flat", "l2", "none"), ("reptile", "tree", "none", "none"), ("mmp", "flat", "robust", "sharded"),
        ("mmp", "tree", "per_task", "sharded"), ("mmp", "graph", "per_group", "sharded")]
GLOO_STEPS = 3


def _on_two_ranks(rank: int, reducer: Any, out: str) -> None:
    for combo in GLOO:
        b = build(*combo, Path(out) / combo_id(combo), reducer=reducer)
        for _ in range(GLOO_STEPS):
            b.step()
        save_file(b.state(), f"{out}/{combo_id(combo)}-rank{rank}.safetensors")


def test_two_gloo_ranks_equal_one_process(tmp_path):
    assert {c[1] for c in GLOO} == set(PRIORS) and {c[2] for c in GLOO} == set(PULLS) and {c[0] for c in GLOO} == \
        set(RULES) and all(c in WORKS for c in GLOO)
    spawn_gloo(_on_two_ranks, str(tmp_path))
    for combo in GLOO:
        ref = build(*combo, tmp_path / "one" / combo_id(combo))
        for _ in range(GLOO_STEPS):
            ref.step()
        want = ref.state()
        r0, r1 = (load_file(tmp_path / f"{combo_id(combo)}-rank{r}.safetensors") for r in range(2))
        # sums over ranks add in another order (round-off); a shard keeps v_t in float32
        tol = 1e-12 if combo[3] == "none" else 1e-6
        for k in want:
            if k in ("rows", "seen"):  # each rank holds its block of the tasks
                got = torch.cat([r0[k], r1[k]])
            else:  # every rank takes the same step
                assert torch.equal(r0[k], r1[k]), (combo, k)
                got = r0[k]
            torch.testing.assert_close(got, want[k], rtol=tol, atol=tol, msg=f"{combo} {k}")
