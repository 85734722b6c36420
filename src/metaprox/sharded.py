"""Finite task sets on torch.distributed: per-rank store shards, checkpoints and resume (also re-partitioning).

Task ``t`` of ``n`` is owned by the rank whose contiguous block holds it: rank ``r`` of ``p`` owns
``[lo, hi) = shard_bounds(n, p, r)`` (sizes differ by at most one; needs ``n ≥ p``). Each rank keeps the rows of
its tasks in its own :class:`~metaprox.store.MemmapStore` of ``hi − lo`` rows, wrapped in a
:class:`~metaprox.store.ShardedStore` that is addressed by global task id. Files of a run directory ``DIR``::

    DIR/checkpoint.json, DIR/checkpoint-STEP.safetensors   ← meta state (center, optimizer, step, generator,
                                                             sampler), written by rank 0 only — the commit point
    DIR/store-rank{r}-of-{p}/                              ← rank r's shard (MemmapStore)
    DIR/store-{kind}-rank{r}-of-{p}/                       ← … of one kind, when the tasks come in kinds of
                                                             different shapes (FiniteMultiHeadMMP: one store
                                                             per kind, all committed together)

A checkpoint (:func:`save`, a collective) is a two-phase commit: every rank *prepares* its shard (rows flushed,
``index.pending.json`` written, undo journal kept); a barrier; rank 0 writes the meta state (atomic rename of
``checkpoint.json``: this is the moment the checkpoint exists); a barrier; every rank *finalizes* its shard.
A crash at any point leaves a consistent state: on resume (:func:`open_shard` with ``resume=True``) a shard with
a prepared commit for the step ``checkpoint.json`` names is rolled forward, any other prepared commit is rolled
back from the journal, and every shard must then be at that step.

Resume with another world size re-partitions: the old shards are settled at the checkpoint's step (by rank 0),
then every rank copies the rows of its new block out of the old shards that hold them into a fresh
``store-rank{r}-of-{p'}/`` and commits it. The old shards are left as they are (the checkpoint still names the
old world until the next :func:`save`, so a crash during re-partitioning just repeats it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaprox.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaprox.distributed import LocalReducer, Reducer, shard_bounds
from metaprox.memory import keeper_of
from metaprox.store import MemmapStore, ParamLayout, ShardedStore, pending_meta

__all__ = ["shard_path", "layout_of", "open_shard", "save", "load"]


def shard_path(root: str | Path, rank: int, world: int, kind: str | None = None) -> Path:
    """Rank ``rank``'s shard directory (``store-<kind>-rank…`` for one kind of a set of kinds)."""
    return Path(root) / (f"store-rank{rank}-of-{world}" if kind is None else f"store-{kind}-rank{rank}-of-{world}")


def layout_of(model: nn.Module) -> ParamLayout:
    """The per-task row layout :class:`~metaprox.algorithms.finite.FiniteMMP` uses for ``model``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ParamLayout([n for n, _ in named], [p.shape for _, p in named])


def _barrier(reducer: Reducer, value: float, what: str) -> None:
    check = getattr(reducer, "check_same", None)
    if check is not None:
        check(float(value), what)


def _checkpoint_meta(root: Path) -> dict[str, Any]:
    try:
        meta = json.loads((root / "checkpoint.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no checkpoint in {str(root)!r} (checkpoint.json missing).") from e
    if "finite" not in meta:
        raise CheckpointError(f"{root / 'checkpoint.json'} is not a sharded finite-task checkpoint.")
    return meta


def _settle(path: Path, step: int) -> MemmapStore:
    """Open the shard in ``path`` at checkpoint ``step`` (roll a prepared commit of that step forward)."""
    pending = pending_meta(path)
    store = MemmapStore.open(path, accept_pending=pending is not None and pending.get("step") == step)
    if store.meta.get("step") != step:
        raise CheckpointError(f"store shard {path} is at step {store.meta.get('step')}, the checkpoint at {step}.")
    return store


def open_shard(root: str | Path, layout: ParamLayout, num_tasks: int, reducer: Reducer | None = None,
               resume: bool = False, chunk: int = 4096, kind: str | None = None) -> ShardedStore:
    """This rank's :class:`ShardedStore` of a finite task set of ``num_tasks`` in run directory ``root``
    (``kind``: the store of that kind's ``num_tasks`` tasks, when the tasks come in kinds of different shapes).

    New run (``resume=False``): a fresh, empty shard (an existing one of this world size is replaced). Resume:
    the shard at the step of ``root/checkpoint.json`` — re-partitioned from the old shards when the checkpoint
    was written by another world size. A collective when resuming on several ranks.
    """
    root, reducer = Path(root), reducer or LocalReducer()
    rank, world, n = reducer.rank, reducer.world_size, int(num_tasks)
    if n < world:
        raise ValueError(f"{n} tasks cannot be partitioned over {world} ranks (every rank needs one).")
    lo, hi = shard_bounds(n, world, rank)
    path = shard_path(root, rank, world, kind)
    shard_meta = {"rank": rank, "world": world, "lo": lo, "hi": hi, "num_tasks": n}
    if not resume:
        if path.exists():
            shutil.rmtree(path)
        base = MemmapStore.create(path, layout, hi - lo, chunk=chunk, meta={"step": 0, **shard_meta})
        return ShardedStore(base, lo, hi, n)
    meta = _checkpoint_meta(root)
    step, old_world = int(meta["step"]), int(meta["finite"]["world"])
    held = meta["finite"]["num_tasks"] if kind is None else meta["finite"].get("kinds", {}).get(kind)
    if held is None or int(held) != n:
        what = "" if kind is None else f" of kind {kind!r}"
        raise CheckpointError(f"the checkpoint holds {held} tasks{what}, the task set {n}.")
    if old_world == world:
        base = _settle(path, step)
        if base.layout != layout or base.num_tasks != hi - lo:
            raise CheckpointError(f"store shard {path} was made for other parameters or another partition.")
        return ShardedStore(base, lo, hi, n)
    # another world size: rank 0 settles the old shards, then every rank copies its new block out of them
    if rank == 0:
        for r in range(old_world):
            _settle(shard_path(root, r, old_world, kind), step)
    _barrier(reducer, step, "the checkpoint step (re-partitioning)")
    if path.exists():
        shutil.rmtree(path)
    new = MemmapStore.create(path, layout, hi - lo, chunk=chunk, meta={"step": step, **shard_meta})
    zero = torch.zeros(layout.numel)
    for r in range(old_world):
        olo, ohi = shard_bounds(n, old_world, r)
        a, b = max(lo, olo), min(hi, ohi)
        if a >= b:
            continue
        old = MemmapStore.open(shard_path(root, r, old_world, kind), verify=False)
        if old.layout != layout:
            raise CheckpointError(f"store shard {old.path} was made for other parameters.")
        for start in range(a, b, chunk):
            ids = np.arange(start, min(b, start + chunk))
            rows, seen = old.read(ids - olo, zero)
            if bool(seen.any()):
                new.write(ids[seen.numpy()] - lo, rows[seen])
    new.commit({"step": step, **shard_meta})
    _barrier(reducer, step, "the checkpoint step (re-partitioned)")
    return ShardedStore(new, lo, hi, n)


def _shards(keeper: Any) -> list[tuple[str | None, ShardedStore, MemmapStore]]:
    """(kind, store, its memmap) of the keeper's shard: kind None, or one per kind (a FiniteMultiHeadMMP's
    ``stores``)."""
    stores = keeper.stores if isinstance(getattr(keeper, "stores", None), dict) else {None: keeper.store}
    out = []
    for kind, store in stores.items():
        if not isinstance(store, ShardedStore) or not isinstance(store.base, MemmapStore):
            raise TypeError("save() needs the learner's stores from open_shard().")
        out.append((kind, store, store.base))
    return out


def save(root: str | Path, learner: Any, extra: dict[str, Any] | None = None) -> None:
    """Checkpoint a sharded :class:`~metaprox.algorithms.finite.FiniteMMP` (a collective: every rank calls it),
    or a :class:`~metaprox.algorithms.multihead.FiniteMultiHeadMMP` with one store per kind: the shards and the
    meta state commit together (two-phase commit, see the module doc)."""
    root, reducer = Path(root), learner.reducer
    keeper = keeper_of(learner)
    shards = _shards(keeper)
    step, n = learner.step_count, len(keeper.tasks)
    for _, store, memmap in shards:
        memmap.prepare({"step": step, "rank": reducer.rank, "world": reducer.world_size, "lo": store.lo,
                        "hi": store.hi, "num_tasks": store.num_tasks})
    _barrier(reducer, step, "the checkpoint step")  # every shard is prepared
    if reducer.rank == 0:
        finite: dict[str, Any] = {"world": reducer.world_size, "num_tasks": n}
        if shards[0][0] is not None:
            finite["kinds"] = {kind: store.num_tasks for kind, store, _ in shards}
        sampler = keeper.sampler.state_dict() if hasattr(keeper.sampler, "state_dict") else None
        save_checkpoint(root, learner.state_dict(), {"finite": finite, "sampler": sampler, **(extra or {})})
    _barrier(reducer, step, "the checkpoint step (committed)")  # checkpoint.json names this step
    for _, _, memmap in shards:
        memmap.finalize()


def load(root: str | Path, learner: Any) -> dict[str, Any]:
    """Load the meta state of the checkpoint in ``root`` into ``learner`` (center, optimizer, step, generator,
    sampler); its store must come from :func:`open_shard` with ``resume=True``. Returns the checkpoint's meta."""
    state, meta = load_checkpoint(root)
    if "finite" not in meta:
        raise CheckpointError(f"{Path(root) / 'checkpoint.json'} is not a sharded finite-task checkpoint.")
    learner.load_state_dict(state)
    sampler = keeper_of(learner).sampler
    if meta.get("sampler") is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(meta["sampler"])
    return meta

