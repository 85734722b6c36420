"""FiniteMMP with its tasks partitioned over torch.distributed ranks (2 gloo processes on 127.0.0.1, spawned):
equality with one process (gradient and exact centers, a two-level tree, a graph), per-rank store shards,
two-phase-commit checkpoints, resume with the same and with another world size (re-partitioning)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import metaprox
from _spawn_helpers import spawn_gloo
from metaprox import sharded
from metaprox.algorithms.finite import FiniteMMP
from metaprox.distributed import LocalReducer, shard_bounds
from metaprox.priors import Graph, Tree
from metaprox.store import MemmapStore, MemoryStore, ParamLayout, ShardedStore, pending_meta
from metaprox.tasks.taskset import TaskSampler, TaskSet

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

DT = torch.float64
N_TASKS, STEPS, BATCH = 7, 8, 3  # 7 tasks over 2 ranks: blocks [0, 4) and [4, 7)


def taskset() -> TaskSet:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 1, generator=g, dtype=DT)
    tasks = []
    for i, n in enumerate((6, 9, 6, 12, 9, 6, 15)):  # several shapes: groups are batched per shape
        x = torch.randn(n, 3, generator=g, dtype=DT)
        w = base + 0.7 * torch.randn(3, 1, generator=g, dtype=DT)
        tasks.append(metaprox.Task(x, x @ w + 0.3 * i + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)))
    return TaskSet(tasks, weights=[1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.5])


# the variants compared with one process; tree groups and graph edges cross the rank boundary (tasks 3 | 4)
VARIANTS = {
    "gradient": {},
    "exact": {"center_update": "exact"},
    "tree": {"center_update": "exact",
             "prior": Tree({"root": None, "a": "root", "b": "root"}, ["a", "a", "b", "b", "a", "b", "root"], [0.8],
                           weights=[1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.5])},
    "graph": {"graph": Graph(N_TASKS, [(0, 1, 1.0), (3, 4, 0.5), (1, 5, 0.8), (2, 6, 0.3), (4, 5, 1.2)])},
}


def learner(store=None, reducer=None, variant: str = "gradient") -> FiniteMMP:
    torch.manual_seed(1)
    fm = FiniteMMP(torch.nn.Linear(3, 1).to(DT), taskset(), lam=2.0, task_lam="size",
                   inner=metaprox.SGD(lr=0.05, steps=10), store=store, outer_lr=0.3,
                   meta_optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
                   sampler=TaskSampler(N_TASKS, BATCH, seed=3),  # epochs: some batches miss a rank entirely
                   **VARIANTS[variant])
    if reducer is not None:
        fm.reducer = reducer
    return fm


def center(fm: FiniteMMP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in zip(fm.names, fm.fmodel.params(), strict=True)}


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    return (num / sum(float(a[k].double().square().sum()) for k in a)) ** 0.5


# ----- 2 ranks vs 1 process ------------------------------------------------------------------------------
def _equal_case(rank: int, reducer, out: str) -> None:
    lo, hi = shard_bounds(N_TASKS, 2, rank)
    for variant in VARIANTS:
        store = ShardedStore(MemoryStore(learner().layout, hi - lo, DT), lo, hi, N_TASKS)
        fm = learner(store, reducer, variant)
        calls = reducer.calls
        diags = [fm.step() for _ in range(STEPS)]
        # one all-reduce per outer step (exact centers ride on it); a graph adds the halo of the batch's neighbours
        assert reducer.calls - calls == STEPS * (2 if variant == "graph" else 1), variant
        j = fm.objective()
        rows = fm.rows(np.arange(lo, hi))
        with pytest.raises(IndexError, match="another rank"):
            fm.rows([(hi) % N_TASKS if rank == 0 else 0])
        tensors = {f"rows{rank}": rows, "J": torch.tensor([j], dtype=DT),
                   "diag": torch.tensor([[d["meta_grad_norm"], d["inner_stationarity"]] for d in diags], dtype=DT)}
        if rank == 0:
            tensors.update({f"center/{k}": v for k, v in center(fm).items()})
            if fm.theta is not None:
                tensors["theta"] = fm.theta
        save_file(tensors, f"{out}/{variant}-rank{rank}.safetensors")


def test_two_ranks_equal_one_process(tmp_path):
    """Center, every per-task row (and tree node), objective and diagnostics of 2 ranks vs 1 process, per variant;
    ``pytest -s`` prints the measured relative differences."""
    spawn_gloo(_equal_case, str(tmp_path))
    for variant in VARIANTS:
        ref = learner(variant=variant)
        start = center(ref)
        ref_diags = [ref.step() for _ in range(STEPS)]
        r0, r1 = (load_file(tmp_path / f"{variant}-rank{r}.safetensors") for r in range(2))
        got = {k[len("center/"):]: v for k, v in r0.items() if k.startswith("center/")}
        rows = torch.cat([r0["rows0"], r1["rows1"]])
        ref_rows = ref.rows(np.arange(N_TASKS))
        assert ref.store.initialized(np.arange(N_TASKS)).all()  # every task was solved at least once
        err = {"center": rel(center(ref), got), "rows": float((rows - ref_rows).norm() / ref_rows.norm()),
               "J": abs(float(r0["J"]) / ref.objective() - 1), "moved": rel(start, center(ref))}
        if ref.theta is not None:
            err["theta"] = float((r0["theta"] - ref.theta).norm() / ref.theta.norm())
        print(variant, {k: f"{v:.1e}" for k, v in err.items()})
        assert err["moved"] > 0.1, variant  # the comparison is not between two untouched centers
        assert max(v for k, v in err.items() if k != "moved") <= 1e-6, (variant, err)
        assert err["J"] <= 1e-9, (variant, err)
        assert float(r1["J"]) == float(r0["J"])
        ref_d = torch.tensor([[d["meta_grad_norm"], d["inner_stationarity"]] for d in ref_diags], dtype=DT)
        assert torch.allclose(r0["diag"], ref_d, rtol=1e-6, atol=1e-12), variant


# ----- checkpoints and resume ---------------------------------------------------------------------------------
def _run(root: Path, reducer, resume: bool, steps: int, save_at: tuple[int, ...] = ()) -> FiniteMMP:
    fm = learner(sharded.open_shard(root, sharded.layout_of(learner().model), N_TASKS, reducer, resume=resume,
                                    chunk=2), reducer)
    if resume:
        sharded.load(root, fm)
    for _ in range(steps):
        fm.step()
        if fm.step_count in save_at:
            sharded.save(root, fm)
    return fm


def _dump(fm: FiniteMMP, path: str) -> None:
    lo, hi = fm.owned_range()
    save_file({"rows": fm.rows(np.arange(lo, hi)), **{f"center/{k}": v for k, v in center(fm).items()}}, path)


def _resume_case(rank: int, reducer, out: str) -> None:
    out_p = Path(out)
    whole = _run(out_p / "whole", reducer, False, STEPS, save_at=(STEPS,))
    _dump(whole, f"{out}/whole{rank}.safetensors")
    # interrupted: a checkpoint at step 3, then 2 steps whose rows reach the memmap but are never committed,
    # then a prepared-but-not-committed shard (rank 1 only: a crash between the two phases)
    cut = _run(out_p / "cut", reducer, False, 5, save_at=(3,))
    if rank == 1:
        cut.store.base.prepare({"step": cut.step_count})
    del cut
    resumed = _run(out_p / "cut", reducer, True, STEPS - 3)
    assert resumed.step_count == STEPS
    _dump(resumed, f"{out}/resumed{rank}.safetensors")


def test_checkpoint_resume_same_and_other_world_size(tmp_path):
    spawn_gloo(_resume_case, str(tmp_path))
    for r in range(2):
        whole, resumed = load_file(tmp_path / f"whole{r}.safetensors"), load_file(tmp_path / f"resumed{r}.safetensors")
        assert whole.keys() == resumed.keys()
        for k in whole:  # same world size: bitwise
            assert torch.equal(whole[k], resumed[k]), (r, k)
    for r in range(2):
        assert (tmp_path / "whole" / f"store-rank{r}-of-2" / "index.json").is_file()
        assert not (tmp_path / "cut" / f"store-rank{r}-of-2" / "index.pending.json").exists()
    # another world size: the 2-rank checkpoint at step STEPS, resumed in 1 process (re-partitioned into one shard)
    one = _run(tmp_path / "whole", LocalReducer(), True, 0)
    assert one.step_count == STEPS and isinstance(one.store.base, MemmapStore)
    assert (tmp_path / "whole" / "store-rank0-of-1" / "index.json").is_file()
    rows = torch.cat([load_file(tmp_path / f"whole{r}.safetensors")["rows"] for r in range(2)])
    assert torch.equal(one.rows(np.arange(N_TASKS)), rows)
    got = {k[len("center/"):]: v for k, v in load_file(tmp_path / "whole0.safetensors").items()
           if k.startswith("center/")}
    assert all(torch.equal(center(one)[k], got[k]) for k in got)
    for _ in range(3):  # and it trains on: same as a 1-process run over the same store precision
        one.step()
    ref = _run(tmp_path / "ref", LocalReducer(), False, STEPS + 3)
    assert rel(center(ref), center(one)) <= 1e-6
    assert float((ref.rows(np.arange(N_TASKS)) - one.rows(np.arange(N_TASKS))).norm()
                 / ref.rows(np.arange(N_TASKS)).norm()) <= 1e-6


def test_two_phase_commit_of_a_memmap_store(tmp_path):
    layout = ParamLayout(["w"], [(2,)])
    store = MemmapStore.create(tmp_path / "s", layout, 5, chunk=2)
    store.write([1], torch.ones(1, 2))
    store.commit({"step": 1})
    store.write([1, 4], torch.full((2, 2), 2.0))
    store.prepare({"step": 2})
    assert pending_meta(tmp_path / "s") == {"step": 2}
    del store
    back = MemmapStore.open(tmp_path / "s")  # not committed by the coordinator: rolled back
    assert back.meta == {"step": 1} and back.read([1, 4], torch.zeros(2))[0].tolist() == [[1, 1], [0, 0]]
    back.write([1, 4], torch.full((2, 2), 2.0))
    back.prepare({"step": 2})
    del back
    fwd = MemmapStore.open(tmp_path / "s", accept_pending=True)  # committed: rolled forward, checksums verified
    assert fwd.meta == {"step": 2} and fwd.read([1, 4], torch.zeros(2))[0].tolist() == [[2, 2], [2, 2]]
    fwd.write([0], torch.full((1, 2), 3.0))
    fwd.prepare({"step": 3})
    fwd.finalize()
    assert MemmapStore.open(tmp_path / "s").meta == {"step": 3}


class _TwoRanks(LocalReducer):
    world_size = 2


def test_sharded_step_refuses_a_wrong_store():
    fm = learner(reducer=_TwoRanks())
    with pytest.raises(ValueError, match="shard of the store"):
        fm.step()


def test_sharded_step_refuses_inner_minibatches():
    fm = learner(ShardedStore(MemoryStore(learner().layout, 4, DT), 0, 4, N_TASKS), _TwoRanks())
    fm.inner = metaprox.SGD(lr=0.05, steps=10, batch_size=2)
    with pytest.raises(ValueError, match="full-batch inner solves"):
        fm.step()
