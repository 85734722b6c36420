"""Per-task parameter stores for the finite setting: every named task keeps its own ``v_t`` across outer steps.

A store maps task indices ``0..n-1`` to flat parameter vectors (one row per task) plus an "initialized" flag;
a row that was never written reads as the caller's default (the center), so warm starts begin at the prior.

- :class:`MemoryStore` — a ``(n, P)`` tensor in RAM.
- :class:`MemmapStore` — a numpy memmap on disk, designed for ~10⁶ tasks × small private parameters. Layout of
  its directory::

      index.json      ← layout (names, shapes), n, chunk size, per-chunk sha256, generation, user metadata
      params.f32      ← n rows of (1 + P) float32: [initialized flag, flat parameters]
      journal/        ← undo log: pristine copies of the chunks modified since the last commit

  Writes go straight into the memmap; before a chunk is first modified after a commit its old bytes are saved
  (fsynced) in ``journal/``. :meth:`MemmapStore.commit` flushes the memmap, records the chunk checksums in
  ``index.json`` (atomic replace) and only then empties the journal. Every journal file is tagged with the
  generation of the commit it restores (``chunk-C.gG.bak``). Opening a store rolls back the chunks whose
  journal files carry the index's generation (a crash between commits) and deletes those of an older
  generation (a crash after the index was replaced but before the journal was emptied: that commit is
  complete), so the store always reopens at its last commit — atomic at commit granularity and resumable.
  Checksums are verified on open (``verify=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaprox.checkpoint import CheckpointError, atomic_write

__all__ = ["ParamLayout", "TaskStore", "MemoryStore", "MemmapStore", "ShardedStore"]

Tensors = list[torch.Tensor]
FORMAT = 1
PENDING = "index.pending.json"  # phase 1 of a two-phase commit (MemmapStore.prepare)


class ParamLayout:
    """Names and shapes of per-task parameters; flattens a stack of tasks to rows ``(B, P)`` and back."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError("ParamLayout: one shape per name.")
        self.names = list(names)
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    @classmethod
    def of(cls, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> ParamLayout:
        return cls(names, [t.shape for t in tensors])

    def flatten(self, v: Tensors) -> torch.Tensor:
        """Stacked tensors (leading task axis) → rows ``(B, P)``."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in v], 1)

    def unflatten(self, rows: torch.Tensor) -> Tensors:
        """Rows ``(B, P)`` → stacked tensors with a leading task axis."""
        parts = torch.split(rows, self.sizes, dim=1)
        return [p.reshape(rows.shape[0], *s) for p, s in zip(parts, self.shapes, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "shapes": [list(s) for s in self.shapes]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.names == other.names and self.shapes == other.shapes


def _index(idx: Any) -> np.ndarray:
    a = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
    return a


class TaskStore:
    """Interface: ``read(idx, default)`` → (rows, initialized), ``write(idx, rows)``, ``commit(meta)``."""

    layout: ParamLayout
    num_tasks: int
    #: precision the rows are kept in (a write rounds to it); None: not declared (taken as the caller's dtype)
    dtype: torch.dtype | None = None

    def _check(self, idx: np.ndarray) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_tasks):
            raise IndexError(f"task index out of range [0, {self.num_tasks}).")

    def read(self, idx: Any, default: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of tasks ``idx`` as a ``(B, P)`` tensor (dtype of ``default``); never-written rows are
        ``default`` (shape ``(P,)`` or ``(B, P)``). Also returns the bool mask of initialized rows."""
        raise NotImplementedError

    def write(self, idx: Any, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def initialized(self, idx: Any) -> torch.Tensor:
        raise NotImplementedError

    def commit(self, meta: dict[str, Any] | None = None) -> None:
        """Make the writes so far durable (no-op in memory)."""

    def get(self, idx: Any, default: Tensors) -> tuple[Tensors, torch.Tensor]:
        """Like :meth:`read`, unflattened; ``default`` is a list of tensors (the center, task axis optional)."""
        b = _index(idx).size
        flat = self.layout.flatten([d.reshape(-1, *s).expand(b, *s)
                                    for d, s in zip(default, self.layout.shapes, strict=True)])
        rows, mask = self.read(idx, flat)
        return self.layout.unflatten(rows), mask

    def put(self, idx: Any, v: Tensors) -> None:
        self.write(idx, self.layout.flatten([t.detach() for t in v]))


class MemoryStore(TaskStore):
    """All per-task rows in one RAM tensor ``(n, P)`` (dtype of the model by default)."""

    def __init__(self, layout: ParamLayout, num_tasks: int, dtype: torch.dtype = torch.float32):
        self.layout, self.num_tasks = layout, int(num_tasks)
        self.data = torch.zeros(self.num_tasks, layout.numel, dtype=dtype)
        self.dtype = dtype
        self.seen = torch.zeros(self.num_tasks, dtype=torch.bool)

    def read(self, idx, default):
        i = torch.from_numpy(_index(idx))
        self._check(i.numpy())
        mask = self.seen[i]
        rows = torch.where(mask.unsqueeze(1), self.data[i].to(default.dtype), default.expand(len(i), -1))
        return rows, mask

    def write(self, idx, rows):
        i = torch.from_numpy(_index(idx))
        self._check(i.numpy())
        self.data[i] = rows.to(self.data.dtype)
        self.seen[i] = True

    def initialized(self, idx):
        return self.seen[torch.from_numpy(_index(idx))]


class MemmapStore(TaskStore):
    """Per-task rows in a float32 numpy memmap with an undo journal and per-chunk sha256 (see module doc).

    Create with :meth:`create`, reopen with :meth:`open` (rolls back uncommitted writes, verifies checksums).
    """

    dtype = torch.float32

    def __init__(self, path: Path, layout: ParamLayout, num_tasks: int, chunk: int, checksums: list[str],
                 generation: int, meta: dict[str, Any]):
        self.path, self.layout, self.num_tasks, self.chunk = path, layout, int(num_tasks), int(chunk)
        self.width = layout.numel + 1
        self.checksums, self.generation, self.meta = checksums, generation, meta
        self.mm = np.memmap(path / "params.f32", dtype=np.float32, mode="r+", shape=(self.num_tasks, self.width))
        self._journaled: set[int] = set()

    # ----- creation / opening ----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, layout: ParamLayout, num_tasks: int, chunk: int = 4096,
               meta: dict[str, Any] | None = None) -> MemmapStore:
        """A new empty store (every row uninitialized) in directory ``path`` (must not hold a store)."""
        path = Path(path)
        if (path / "index.json").exists():
            raise FileExistsError(f"{path} already holds a task store; open it with MemmapStore.open().")
        if int(num_tasks) < 1 or int(chunk) < 1:
            raise ValueError("num_tasks and chunk must be ≥ 1.")
        path.mkdir(parents=True, exist_ok=True)
        (path / "journal").mkdir(exist_ok=True)
        width = layout.numel + 1
        with open(path / "params.f32", "wb") as f:  # sparse file of zeros (= uninitialized rows)
            f.truncate(int(num_tasks) * width * 4)
            f.flush()
            os.fsync(f.fileno())
        nchunks = -(-int(num_tasks) // int(chunk))
        full = hashlib.sha256(bytes(int(chunk) * width * 4)).hexdigest()
        last_rows = int(num_tasks) - (nchunks - 1) * int(chunk)
        checksums = [full] * (nchunks - 1) + [hashlib.sha256(bytes(last_rows * width * 4)).hexdigest()]
        store = cls(path, layout, num_tasks, chunk, checksums, 0, dict(meta or {}))
        store._write_index()
        return store

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, accept_pending: bool = False) -> MemmapStore:
        """Reopen a store at its last commit: roll back uncommitted chunks from the journal, verify checksums.

        A commit that was prepared (:meth:`prepare`) but not finalized (:meth:`finalize`) is rolled back, or — with
        ``accept_pending`` (its coordinator did commit; see :func:`pending_meta`) — rolled forward."""
        path = Path(path)
        if (path / PENDING).exists():  # a two-phase commit that was prepared but not finalized
            if accept_pending:  # the coordinator committed: roll forward to the prepared state
                os.replace(path / PENDING, path / "index.json")
                for f in (path / "journal").glob("chunk-*.bak"):
                    f.unlink()
            else:  # not committed: forget it, the journal rolls the chunks back below
                (path / PENDING).unlink()
        try:
            index = json.loads((path / "index.json").read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"no task store in {path} (index.json missing).") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / 'index.json'} is corrupt: {e}") from e
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{path}: task store format {index.get('format')}, this metaprox reads {FORMAT}.")
        layout = ParamLayout(index["layout"]["names"], index["layout"]["shapes"])
        n, chunk = int(index["num_tasks"]), int(index["chunk"])
        size = (path / "params.f32").stat().st_size
        if size != n * (layout.numel + 1) * 4:
            raise CheckpointError(f"{path / 'params.f32'} has {size} bytes, expected {n * (layout.numel + 1) * 4}.")
        store = cls(path, layout, n, chunk, list(index["checksums"]), int(index["generation"]), index["meta"])
        store._rollback()
        if verify:
            bad = [c for c in range(len(store.checksums)) if store._hash(c) != store.checksums[c]]
            if bad:
                raise CheckpointError(f"{path}: {len(bad)} chunk(s) of params.f32 fail their sha256 "
                                      f"(first: chunk {bad[0]}); the store is corrupt.")
        return store

    # ----- journal -------------------------------------------------------------------------------
    def _rows(self, c: int) -> slice:
        return slice(c * self.chunk, min((c + 1) * self.chunk, self.num_tasks))

    def _hash(self, c: int) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.mm[self._rows(c)]).tobytes()).hexdigest()

    def _journal_file(self, c: int) -> Path:
        return self.path / "journal" / f"chunk-{c:08d}.g{self.generation}.bak"

    @staticmethod
    def _journal_entry(f: Path) -> tuple[int, int | None]:
        """(chunk, generation) of a journal file; files of older versions carry no generation (None)."""
        parts = f.name.removesuffix(".bak").split(".")
        return int(parts[0].split("-")[1]), int(parts[1][1:]) if len(parts) > 1 else None

    def _save_undo(self, chunks: np.ndarray) -> None:
        for c in chunks.tolist():
            if c in self._journaled:
                continue
            atomic_write(self._journal_file(c), np.ascontiguousarray(self.mm[self._rows(c)]).tobytes())
            self._journaled.add(c)

    def _clear_journal(self) -> None:
        """Drop the undo data once the new index is in place (the commit is complete)."""
        for f in (self.path / "journal").glob("chunk-*.bak"):
            f.unlink()
        self._journaled.clear()

    def _rollback(self) -> None:
        files = sorted((self.path / "journal").glob("chunk-*.bak"))
        for f in files:
            c, generation = self._journal_entry(f)
            if generation is not None and generation != self.generation:
                continue  # undo data of a commit that completed (index replaced, journal not yet emptied)
            rows = self._rows(c)
            self.mm[rows] = np.frombuffer(f.read_bytes(), dtype=np.float32).reshape(-1, self.width)
        if files:
            self.mm.flush()
            for f in files:
                f.unlink()
        self._journaled.clear()

    def _write_index(self) -> None:
        index = {"format": FORMAT, "layout": self.layout.to_json(), "num_tasks": self.num_tasks,
                 "chunk": self.chunk, "dtype": "float32", "row": "[initialized flag, flat params]",
                 "generation": self.generation, "checksums": self.checksums, "meta": self.meta}
        atomic_write(self.path / "index.json", json.dumps(index))

    # ----- reads and writes -------------------------------------------------------------------------
    def read(self, idx, default):
        i = _index(idx)
        self._check(i)
        raw = torch.from_numpy(np.asarray(self.mm[i]))
        mask = raw[:, 0] > 0.5
        rows = torch.where(mask.unsqueeze(1), raw[:, 1:].to(default.dtype), default.expand(len(i), -1))
        return rows, mask

    def write(self, idx, rows):
        i = _index(idx)
        self._check(i)
        self._save_undo(np.unique(i // self.chunk))
        out = np.empty((len(i), self.width), dtype=np.float32)
        out[:, 0] = 1.0
        out[:, 1:] = rows.detach().cpu().to(torch.float32).numpy()
        self.mm[i] = out

    def initialized(self, idx):
        i = _index(idx)
        return torch.from_numpy(np.asarray(self.mm[i, 0]) > 0.5)

    def commit(self, meta: dict[str, Any] | None = None) -> None:
        """Flush, record checksums of the touched chunks and ``meta`` atomically, then clear the journal."""
        self.mm.flush()
        with open(self.path / "params.f32", "rb+") as f:
            os.fsync(f.fileno())
        for c in sorted(self._journaled):
            self.checksums[c] = self._hash(c)
        self.generation += 1
        if meta is not None:
            self.meta = dict(meta)
        self._write_index()
        self._clear_journal()

    # ----- two-phase commit (several stores that must commit together, e.g. the shards of the ranks) -------
    def prepare(self, meta: dict[str, Any] | None = None) -> None:
        """Phase 1 of a two-phase commit: flush and fsync the rows, write the new checksums, generation and
        ``meta`` to ``index.pending.json`` — but keep the journal, so the store still reopens at its previous
        commit unless :meth:`open` is told ``accept_pending``. No writes between this and :meth:`finalize`."""
        self.mm.flush()
        with open(self.path / "params.f32", "rb+") as f:
            os.fsync(f.fileno())
        checksums = list(self.checksums)
        for c in sorted(self._journaled):
            checksums[c] = self._hash(c)
        index = {"format": FORMAT, "layout": self.layout.to_json(), "num_tasks": self.num_tasks,
                 "chunk": self.chunk, "dtype": "float32", "row": "[initialized flag, flat params]",
                 "generation": self.generation + 1, "checksums": checksums,
                 "meta": dict(meta) if meta is not None else self.meta}
        atomic_write(self.path / PENDING, json.dumps(index))

    def finalize(self) -> None:
        """Phase 2: install the prepared index (atomic rename) and empty the journal."""
        index = json.loads((self.path / PENDING).read_text())
        os.replace(self.path / PENDING, self.path / "index.json")
        self.checksums, self.generation, self.meta = list(index["checksums"]), int(index["generation"]), index["meta"]
        self._clear_journal()


def pending_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``meta`` of a prepared, not finalized commit of the store in ``path`` (None if there is none)."""
    try:
        return json.loads((Path(path) / PENDING).read_text())["meta"]
    except (OSError, ValueError, KeyError):
        return None


class ShardedStore(TaskStore):
    """The rows of the tasks ``[lo, hi)`` of ``num_tasks``, kept in ``base`` (a store of ``hi - lo`` rows) and
    addressed by global task index — one rank's shard of a finite task set (see :mod:`metaprox.sharded`).
    Touching a task outside ``[lo, hi)`` raises :class:`IndexError` (it belongs to another rank)."""

    def __init__(self, base: TaskStore, lo: int, hi: int, num_tasks: int):
        if not 0 <= lo < hi <= num_tasks or base.num_tasks != hi - lo:
            raise ValueError(f"a shard [{lo}, {hi}) of {num_tasks} tasks needs a base store of {hi - lo} rows "
                             f"(got {base.num_tasks}).")
        self.base, self.lo, self.hi = base, int(lo), int(hi)
        self.layout, self.num_tasks, self.dtype = base.layout, int(num_tasks), base.dtype

    def owns(self, idx: Any) -> np.ndarray:
        i = _index(idx)
        return (i >= self.lo) & (i < self.hi)

    def _local(self, idx: Any) -> np.ndarray:
        i = _index(idx)
        self._check(i)
        if not self.owns(i).all():
            raise IndexError(f"task(s) {i[~self.owns(i)][:5].tolist()} belong to another rank: this shard holds "
                             f"tasks [{self.lo}, {self.hi}).")
        return i - self.lo

    def read(self, idx, default):
        return self.base.read(self._local(idx), default)

    def write(self, idx, rows):
        self.base.write(self._local(idx), rows)

    def initialized(self, idx):
        return self.base.initialized(self._local(idx))

    def commit(self, meta: dict[str, Any] | None = None) -> None:
        self.base.commit(meta)
